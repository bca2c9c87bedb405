"""`--objective` on the command line and in YAML recipes: the same objective values, written as text.

    maximize                                  each problem's activation (the run's --features)
    l1                                        the documents' ||C - O_f(e)||_1, C = --target
    l1_target(C=100) - 0.5 * maximize(site='blocks.2.mlp_out', features='[:, :, 3]')
    maximize(sae='runs/sae-l6', features='[:, :, 7]') - 0.2 * maximize(site='blocks.6.mlp_hidden', features='[:, :, 12]')
    logprob(token=' Paris')      direction(vector='dir.pt', layer=6)      latent(sae='DIR', features='[:, :, 3]')

Terms combine with `+`, `-`, `*` by a number and parentheses. A term without `features` or
`site` reads the run's own (`--features` at each `--layer`/`--site`, or the `--sae` latents); a
term with its own features scores them for every problem when it names one problem (a fixed
feature subtracted from each), or one per problem when it names as many as the run. Only these
names and literal arguments are read: the text is parsed, never evaluated as Python.
"""

from __future__ import annotations

import ast
from collections.abc import Callable
from dataclasses import dataclass, field

from featopt.errors import FeatoptError
from featopt.models import Site
from featopt.objectives.objective import Objective
from featopt.objectives.selection import OVER, Selection
from featopt.objectives.targets import L1Target, Maximize, TokenTarget, direction

_HELP = ("write terms such as maximize, l1, l1_target(C=100), maximize(site='blocks.2.mlp_out', features='[:, :, 3]'), "
         "latent(sae='DIR', features='[:, :, 7]'), direction(vector='v.pt', layer=6), logit(token=' Paris') or "
         "logprob(token=' Paris'), combined with +, - and * by a number")


@dataclass
class Defaults:
    """What a term reads when it names nothing: the run's site, features and settings.

    `extra` adds names a command defines (inversion's `l1` and `cosine` distances to its texts);
    each gets the term's keyword arguments.
    """

    site: Site | str
    features: str
    over: str = "mean"
    target: float = 100.0
    n_tokens: int | None = None  # the input length, when known: positions are checked against it
    extra: dict[str, Callable[..., Objective]] = field(default_factory=dict)


def parse_objective(text: str, defaults: Defaults) -> Objective:
    """The objective `text` names (see the module docstring); one sentence on anything else."""
    if isinstance(text, Objective):
        return text
    if not isinstance(text, str) or not text.strip():
        raise FeatoptError(f"--objective is empty: {_HELP}.")
    try:
        tree = ast.parse(text.strip(), mode="eval").body
    except SyntaxError:
        raise FeatoptError(f"--objective {text!r} is malformed: {_HELP}.") from None
    return _Builder(text, defaults).build(tree)


class _Builder:
    def __init__(self, text: str, defaults: Defaults):
        self.text, self.defaults = text, defaults

    def fail(self, what: str) -> FeatoptError:
        return FeatoptError(f"--objective {self.text!r}: {what}; {_HELP}.")

    def build(self, node: ast.AST) -> Objective:
        if isinstance(node, ast.BinOp) and isinstance(node.op, (ast.Add, ast.Sub)):
            left, right = self.build(node.left), self.build(node.right)
            return left + right if isinstance(node.op, ast.Add) else left - right
        if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Mult):
            for number, term in ((node.left, node.right), (node.right, node.left)):
                if _is_number(number):
                    return _number(number) * self.build(term)
            raise self.fail("a product needs a number on one side")
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
            inner = self.build(node.operand)
            return -inner if isinstance(node.op, ast.USub) else inner
        if isinstance(node, ast.Name):
            return self.term(node.id, [], {})
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
            args = [self.literal(a) for a in node.args]
            kwargs = {k.arg: self.literal(k.value) for k in node.keywords}
            if None in kwargs:
                raise self.fail("write every argument as name=value")
            return self.term(node.func.id, args, kwargs)
        raise self.fail(f"{ast.unparse(node)!r} is not a term")

    def literal(self, node: ast.AST):
        if isinstance(node, ast.Constant) and isinstance(node.value, (str, int, float)) and not isinstance(node.value, bool):
            return node.value
        if _is_number(node):
            return _number(node)
        raise self.fail(f"argument {ast.unparse(node)!r} is not a number or a quoted text")

    def term(self, name: str, args: list, kwargs: dict) -> Objective:
        d = self.defaults
        if name in d.extra:
            return d.extra[name](*args, **kwargs)
        builders = {"l1": self.l1, "maximize": self.maximize, "l1_target": self.l1, "latent": self.latent,
                    "direction": self.direction, "logit": self.token, "logprob": self.token}
        if name not in builders:
            names = ", ".join(dict.fromkeys([*d.extra, *builders]))
            raise FeatoptError(f"--objective {self.text!r}: {name!r} is not an objective: allowed are {names}, "
                               "combined with +, - and * by a number (docs/extending.md).")
        try:
            return builders[name](*args, **({"log_probs": True} if name == "logprob" else {}), **kwargs)
        except TypeError as error:
            raise self.fail(f"{name}: {' '.join(str(error).split()).split(') ', 1)[-1]}") from None

    def selection(self, features: str | None, site: str | None, layer: int | None, over: str | None,
                  sae: str | None) -> Selection:
        d = self.defaults
        over = over or d.over
        if over not in OVER:
            raise self.fail(f"over={over!r} is not known (allowed: {', '.join(OVER)})")
        feature_map = None
        if sae is not None:
            from featopt.models.sae.attach import site_of
            from featopt.models.sae.formats import load_sae

            feature_map = load_sae(sae)
            feature_map.source = str(sae)
            site = site or site_of(feature_map)
        elif site is None and layer is None:
            site = d.site
        elif site is None or not str(site).startswith("blocks."):
            kind = str(site or (d.site.kind if isinstance(d.site, Site) else "resid_post"))
            site = f"blocks.{layer if layer is not None else d.site.layer}.{kind}"
        return Selection(site, features or d.features, d.n_tokens, feature_map=feature_map, over=over)

    def maximize(self, features: str | None = None, site: str | None = None, layer: int | None = None,
                 over: str | None = None, sae: str | None = None) -> Objective:
        return Maximize(self.selection(features, site, layer, over, sae))

    def l1(self, C: float | None = None, features: str | None = None, site: str | None = None,
           layer: int | None = None, over: str | None = None, sae: str | None = None, target: float | None = None) -> Objective:
        value = C if C is not None else target if target is not None else self.defaults.target
        return L1Target(self.selection(features, site, layer, over, sae), float(value))

    def latent(self, sae: str, features: str | None = None, over: str | None = None) -> Objective:
        return Maximize(self.selection(features, None, None, over, sae))

    def direction(self, vector: str, site: str | None = None, layer: int | None = None, positions: str = ":",
                  over: str | None = None) -> Objective:
        chosen = self.selection("[:, :, 0]", site, layer, over, None)
        return direction(vector, chosen.site, positions, over=chosen.over)

    def token(self, token: str | int, log_probs: bool = False) -> Objective:
        return TokenTarget(token, log_probs=log_probs)


def _is_number(node: ast.AST) -> bool:
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
        return _is_number(node.operand)
    return isinstance(node, ast.Constant) and isinstance(node.value, (int, float)) and not isinstance(node.value, bool)


def _number(node: ast.AST) -> float:
    if isinstance(node, ast.UnaryOp):
        return -_number(node.operand) if isinstance(node.op, ast.USub) else _number(node.operand)
    return float(node.value)
