"""TRANSITION: what other wings still import from the old search module; removed once they use
`featopt.commands.loading`, `featopt.runs.outdir` and `featopt.models.DTYPES`."""

from featopt.commands.loading import load_for as load  # noqa: F401
from featopt.models import DTYPES  # noqa: F401
from featopt.runs.outdir import out_folder
from featopt.specs import parse_layers, parse_sites  # noqa: F401


def out_dir(config):
    return out_folder(config.out)
