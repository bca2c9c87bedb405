"""The socket guard of `tests/conftest.py`: a connection to another machine fails the test that
makes it, while loopback (torch.distributed's store for the two-process tests) still works."""

from __future__ import annotations

import socket
import threading

import pytest

# The guard's error, by its message: `conftest` is not importable by name (tests/discrete has one too).
GUARD = dict(expected_exception=RuntimeError, match="tests run offline")


@pytest.mark.parametrize("address", [("93.184.216.34", 80), ("2606:2800:220:1::", 443), ("huggingface.co", 443)])
def test_a_connection_to_another_machine_fails(address):
    family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s, pytest.raises(**GUARD):
        s.connect(address)
    with socket.socket(family, socket.SOCK_STREAM) as s, pytest.raises(**GUARD):
        s.connect_ex(address)


def test_create_connection_is_guarded_too():
    with pytest.raises(**GUARD):
        socket.create_connection(("93.184.216.34", 80), timeout=1)


def test_loopback_still_connects():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as server:
        server.bind(("127.0.0.1", 0))
        server.listen(1)
        accepted = []
        thread = threading.Thread(target=lambda: accepted.append(server.accept()[0].recv(5)))
        thread.start()
        with socket.create_connection(server.getsockname(), timeout=5) as client:
            client.sendall(b"hello")
        thread.join(5)
    assert accepted == [b"hello"]
