"""The softmax-simplex prior: its forward against a loop, its projection against the document's
update written by hand, its schedule, its checkpoints, and that it finds tokens that fire."""

from __future__ import annotations

import math
import pickle

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from featopt.errors import FeatoptError
from featopt.specs import parse_features
from featopt.models import ModelAdapter
from featopt.models.tiny import build_tiny
from featopt.gradient.module import FeatureOptimization
from featopt.runs.lightning import StepsDataModule
from featopt.gradient.simplex import SimplexEmbeddings
from featopt.objectives.targets import Selection, maximize

LAYER = 1


@pytest.fixture(scope="module")
def tiny():
    model, tok = build_tiny("tiny-llama")
    return ModelAdapter(model, tok, name="tiny-llama")


def _selection(adapter, spec="[:, :, 0-1]", tokens=3):
    site = adapter.site("resid_post", LAYER)
    width = adapter.width(site)
    return Selection(site, parse_features(spec, n_tokens=tokens, width=width), tokens, width)


def _hf_resid(adapter, **inputs):
    """Block LAYER's output by a plain, full HF forward (hidden_states[0] is the embeddings)."""
    return adapter.model(**inputs, output_hidden_states=True).hidden_states[LAYER + 1]


class SGDOptimization(FeatureOptimization):
    def configure_optimizers(self):
        return torch.optim.SGD(self.parametrization.parameters(), lr=self.lr)


def _trainer(steps, **kw):
    return L.Trainer(accelerator="cpu", max_steps=steps, logger=False, enable_progress_bar=False,
                     enable_model_summary=False, num_sanity_val_steps=0, **{"enable_checkpointing": False, **kw})


def test_forward_is_the_expected_embedding(tiny):
    E = tiny.embedding.detach()
    simplex = SimplexEmbeddings.uniform(2, 3, E.shape[0], seed=1, noise=2.0, temperature=0.7)
    simplex.bind(tiny)
    got = simplex(torch.tensor([1]))
    a = simplex.logits.detach()
    for t in range(3):
        w = [math.exp(a[1, t, v].item() / 0.7) for v in range(E.shape[0])]
        want = sum((w[v] / sum(w)) * E[v].double() for v in range(E.shape[0]))
        torch.testing.assert_close(got[0, t].double(), want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("mode", ["softmax", "projected"])
def test_chunked_forward_and_gradient_equal_the_unchunked(tiny, mode):
    V = tiny.vocab_size
    whole = SimplexEmbeddings.uniform(3, 4, V, seed=2, noise=1.0, mode=mode)
    chunked = SimplexEmbeddings.uniform(3, 4, V, seed=2, noise=1.0, mode=mode, chunk_elements=3 * V)  # blocks of 3 rows
    for rows in (None, torch.tensor([2, 0])):
        outs, grads = [], []
        for s in (whole, chunked):
            s.bind(tiny)
            s.logits.grad = None
            out = s(rows)
            (out * torch.linspace(-1, 1, out.numel()).reshape(out.shape)).sum().backward()
            outs.append(out.detach())
            grads.append(s.logits.grad)
        torch.testing.assert_close(outs[1], outs[0], rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(grads[1], grads[0], rtol=1e-6, atol=1e-7)


def test_projected_steps_match_the_documents_update_by_hand(tiny):
    sel = _selection(tiny)
    kw = dict(mode="projected", temperature=0.5, temperature_end=0.1, schedule="exponential")
    simplex = SimplexEmbeddings.uniform(2, 3, tiny.vocab_size, seed=3, noise=1.0, **kw)
    a = simplex.logits.detach().clone()
    module = SGDOptimization(simplex, maximize(sel), sel, tiny, lr=5.0)
    steps = 4
    _trainer(steps).fit(module, datamodule=StepsDataModule(steps))
    E = tiny.embedding.detach()
    for n in range(steps):
        a.requires_grad_(True)
        acts = _hf_resid(tiny, inputs_embeds=a @ E)
        loss = -(acts[0, :, 0].mean() + acts[1, :, 1].mean())  # maximize features 0 and 1, all positions
        (grad,) = torch.autograd.grad(loss, a)
        T = 0.5 * (0.1 / 0.5) ** ((n + 1) / steps)
        a = torch.softmax((a.detach() - 5.0 * grad) / T, dim=-1)
    got = simplex.logits.detach()
    torch.testing.assert_close(got, a, rtol=1e-4, atol=1e-6)
    assert (got >= 0).all()
    torch.testing.assert_close(got.sum(-1), torch.ones(2, 3))
    assert simplex.temperature == pytest.approx(0.1)


def test_schedules_run_from_start_to_end_by_step():
    lin = SimplexEmbeddings.uniform(1, 1, 5, seed=0, temperature=2.0, temperature_end=0.5)
    exp = SimplexEmbeddings.uniform(1, 1, 5, seed=0, temperature=2.0, temperature_end=0.5, schedule="exponential")
    const = SimplexEmbeddings.uniform(1, 1, 5, seed=0, temperature=2.0)
    for step, want_lin, want_exp in ((0, 2.0, 2.0), (50, 1.25, 1.0), (100, 0.5, 0.5), (120, 0.5, 0.5)):
        for s, want in ((lin, want_lin), (exp, want_exp), (const, 2.0)):
            s.after_step(step, 100)
            assert s.temperature == pytest.approx(want)
    lin.after_step(10, 100)
    lin.after_step(3, 100)  # a pure function of the step: going back gives the earlier value
    assert lin.temperature == pytest.approx(2.0 - 1.5 * 0.03)


def test_only_the_logits_are_state_and_the_model_is_never_pickled(tiny):
    sel = _selection(tiny)
    module = FeatureOptimization(SimplexEmbeddings.uniform(2, 3, tiny.vocab_size, seed=0), maximize(sel), sel, tiny)
    assert list(module.state_dict()) == ["parametrization.logits"]
    copy = pickle.loads(pickle.dumps(module.parametrization))
    with pytest.raises(FeatoptError, match="bind"):
        copy()
    assert module.parametrization(None).shape == (2, 3, tiny.d_model)  # the original stays bound


def test_from_ids_peaks_at_the_given_tokens():
    ids = torch.tensor([[5, 7], [1, 0]])
    for mode in ("softmax", "projected"):
        s = SimplexEmbeddings.from_ids(ids, 2, 50, confidence=0.8, mode=mode, temperature=0.3)
        probs = torch.softmax(s.logits / 0.3, -1) if mode == "softmax" else s.logits
        assert s.direct_ids().tolist() == ids.tolist()
        torch.testing.assert_close(probs.max(-1).values, torch.full((2, 2), 0.8))
    shared = SimplexEmbeddings.from_ids(torch.tensor([4, 2, 9]), 3, 50)
    assert shared.direct_ids().tolist() == [[4, 2, 9]] * 3


def test_bad_input_says_what_is_allowed(tiny):
    with pytest.raises(FeatoptError, match="allowed are softmax, projected"):
        SimplexEmbeddings.uniform(1, 1, 5, seed=0, mode="hard")
    with pytest.raises(FeatoptError, match="temperature must be positive"):
        SimplexEmbeddings.uniform(1, 1, 5, seed=0, temperature=0)
    with pytest.raises(FeatoptError, match="vocab=512"):
        SimplexEmbeddings.uniform(1, 1, 5, seed=0).bind(tiny)
    with pytest.raises(FeatoptError, match="bind"):
        SimplexEmbeddings.uniform(1, 1, 5, seed=0)()
    with pytest.raises(FeatoptError, match=r"\[0, 50\)"):
        SimplexEmbeddings.from_ids(torch.tensor([50]), 1, 50)


def test_bfloat16_logits_give_nearly_the_float32_embeddings_and_gradients(tiny):
    f32 = SimplexEmbeddings.uniform(2, 3, tiny.vocab_size, seed=4, noise=3.0)
    weights = torch.linspace(-1, 1, 2 * 3 * tiny.d_model).reshape(2, 3, -1)
    for bf16 in (SimplexEmbeddings(f32.logits.detach(), dtype=torch.bfloat16),
                 SimplexEmbeddings(f32.logits.detach(), dtype=torch.bfloat16, chunk_elements=2 * tiny.vocab_size)):
        for s in (f32, bf16):
            s.bind(tiny)
            s.logits.grad = None
            (s(None) * weights).sum().backward()
        assert bf16.logits.dtype == bf16.logits.grad.dtype == torch.bfloat16
        torch.testing.assert_close(bf16(None), f32(None), rtol=0, atol=0.05 * f32(None).abs().max().item())
        scale = f32.logits.grad.abs().max().item()
        torch.testing.assert_close(bf16.logits.grad.float(), f32.logits.grad, rtol=0, atol=0.05 * scale)


def test_maximize_raises_the_activation_of_the_argmax_tokens(tiny):
    sel = _selection(tiny, "[:, :, 0-3]", tokens=4)
    simplex = SimplexEmbeddings.uniform(4, 4, tiny.vocab_size, seed=5, noise=0.01)
    start = simplex.direct_ids().clone()
    module = FeatureOptimization(simplex, maximize(sel), sel, tiny, lr=0.3)
    _trainer(40).fit(module, datamodule=StepsDataModule(40))

    def measured(ids):  # by a plain HF forward of the tokens: [rows, features 0-3], mean over positions
        with torch.no_grad():
            return _hf_resid(tiny, input_ids=ids)[:, :, :4].mean(dim=1)

    before, after = measured(start).diagonal(), measured(simplex.direct_ids()).diagonal()  # row p scores feature p
    assert (after > before).all(), (before, after)
    # and better than 99 in 100 random 4-token inputs, for every feature
    random_ids = torch.randint(0, tiny.vocab_size, (500, 4), generator=torch.Generator().manual_seed(0))
    assert (after > measured(random_ids).quantile(0.99, dim=0)).all()


def _resume_run(tiny, tmp_path, steps, ckpt=None, every=None, module_cls=FeatureOptimization, **kw):
    sel = _selection(tiny)
    simplex = SimplexEmbeddings.uniform(2, 3, tiny.vocab_size, seed=6, noise=0.5, **kw)
    module = module_cls(simplex, maximize(sel), sel, tiny, lr=0.05)
    callbacks = [ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=every, save_top_k=-1,
                                 filename="step{step}", auto_insert_metric_name=False)] if every else []
    trainer = _trainer(steps, callbacks=callbacks, enable_checkpointing=bool(every))
    trainer.fit(module, datamodule=StepsDataModule(steps), ckpt_path=ckpt)
    return simplex


def test_projected_annealed_run_resumes_to_the_uninterrupted_result(tiny, tmp_path):
    kw = dict(mode="projected", temperature=0.5, temperature_end=0.05, schedule="exponential")
    whole = _resume_run(tiny, tmp_path, 8, every=4, **kw)
    ckpt = tmp_path / "step4.ckpt"
    assert list(torch.load(ckpt, weights_only=False)["state_dict"]) == ["parametrization.logits"]
    resumed = _resume_run(tiny, tmp_path / "r", 8, ckpt=str(ckpt), **kw)
    torch.testing.assert_close(resumed.logits, whole.logits, rtol=0, atol=0)
    assert resumed.temperature == whole.temperature == pytest.approx(0.05)


def test_softmax_annealed_run_resumes_to_the_uninterrupted_result(tiny, tmp_path):
    kw = dict(mode="softmax", temperature=2.0, temperature_end=0.2)
    whole = _resume_run(tiny, tmp_path, 8, every=4, **kw)
    ckpt = str(tmp_path / "step4.ckpt")
    resumed = _resume_run(tiny, tmp_path / "r", 8, ckpt=ckpt, **kw)
    torch.testing.assert_close(resumed.logits, whole.logits, rtol=0, atol=0)
