"""The static SAE feature dashboard: its pages, escaping, folder rules, and a real headless browser."""

from __future__ import annotations

import json
import os
from html.parser import HTMLParser
from pathlib import Path

import pytest

from featopt.errors import FeatoptError
from featopt.dictionaries import dashboard
from featopt.dictionaries.dashboard import write_dashboard
from tests.browser import browser_page

RUN = {"model": "smollm2-135m", "site": "blocks.2.resid_post", "sae": {"path": "runs/sae-l2", "hash": "3f9a0c1d"},
       "corpus": "pile-10k", "tokens": 1_000_000, "seed": 0, "versions": {"featopt": "0.1.0", "torch": "2.13.0"}}
NASTY = ["<script>window.__pwned = 1</script>", "&amp;", '" onmouseover="window.__pwned=2', "'", "\n\n", " <img src=x onerror=window.__pwned=3>"]

TAGS = {"html", "button", "polyline", "circle", "head", "meta", "title", "link", "body", "script", "nav", "a", "h1", "h2", "h3", "p", "br", "b", "section",
        "div", "span", "ol", "li", "pre", "svg", "line", "text", "rect", "dl", "dt", "dd", "table", "thead", "tbody", "tr", "th", "td"}


def _ex(tokens, acts, target, document="pile-00017", position=40):
    return {"activation": acts[target], "context": 3, "index": target, "document": document, "position": position,
            "tokens": tokens, "acts": acts, "target": target}


def _full_latent(i: int) -> dict:
    """A latent with every section, like the source document's German feature."""
    german = [" Die", " Kinder", " sp", "ielen", " im", " Garten", ".", "\n"]
    top = [_ex(german, [0.0, 1.2, 3.5, 8.5, 2.0, 6.1, 0.3, 0.0], 3),
           _ex([" und", " dann", " ging", " er", " nach", " Hause"], [2.2, 5.0, 7.9, 0.4, 1.1, 6.6], 2, "pile-00231", 12),
           _ex(["Q", ":", "\n\n", "Wie", " kann", " ich"], [0.0, 0.0, 0.1, 4.4, 7.0, 5.5], 4, None, None)]
    uniform = [{"bin": [lo, lo + 2.0], "count": c, **_ex([" der", " Hund", " bellt"], [lo + 0.5, lo + 1.0, 0.2], 1)}
               for lo, c in ((0.0, 900), (2.0, 250), (4.0, 70), (6.0, 14))]
    return {
        "latent": i, "tokens": 1_000_000, "fires": 1234, "frequency": 0.001234, "max": 8.5, "mean_when_active": 2.1,
        "histogram": {"bin_width": 1.0, "counts": [700, 300, 130, 60, 25, 10, 6, 2, 1]},
        "top_examples": top, "uniform_examples": uniform,
        "logit_lens": {"norm": "weight", "top": [[" und", 4.1], ["lich", 3.9], [" der", 3.2], ["ung", 3.0]],
                       "bottom": [[" the", -3.3], [" and", -2.9]], "removed": ["<|endoftext|>", " \n"]},
        "ablated_text": [{"example": 0, "tokens": german[:5], "target": 3, "base": 8.5,
                          "change": [-0.4, -1.9, -6.2], "relative": [-0.05, -0.22, -0.73]},
                         {"example": 2, "tokens": top[2]["tokens"], "target": 4, "base": 7.0,
                          "change": [-5.1, 0.2, 0.0, -2.0], "relative": [-0.73, 0.03, None, -0.29]}],
        "direction_ablation": {"mode": "contribution",
                               "examples": [{"example": 0, "tokens": german, "delta": [-0.2, -1.5, -4.0, -0.6, -2.2, 0.4, 0.1]}],
                               "decreased": [["ielen", -4.0], [" Garten", -2.2]], "increased": [[" the", 0.4]]},
        "max_inputs": {"exhaustive": [[" und", 9.4], [" Kinder", 8.8], [" über", 8.1]]},
        "inputs": _inputs_record(),
    }


def _point(tokens, acts, xent):
    return {"tokens": tokens, "token_ids": list(range(len(tokens))), "text": "".join(tokens[1:]), "acts": acts,
            "activation": acts[-1], "xent": xent, "ratio": acts[-1] / 8.5}


def _inputs_record() -> dict:
    """What `featopt sae inputs` records for a latent whose corpus max is 8.5."""
    best = _point(["<|endoftext|>", " dann", " spielen", " die", " Kinder", " und"], [0.0, 0.5, 2.0, 1.0, 6.0, 14.2], 7.9)
    fluent = _point(["<|endoftext|>", " Die", " Kinder", " sp", "ielen"], [0.0, 0.1, 1.5, 2.0, 7.0], 3.1)
    return {"corpus_max": 8.5, "corpus_windows": 3, "corpus_window_xent": [3.2, 3.6, 4.4],
            "corpus_window_alone": [6.0, 5.1, 4.0], "fluency_threshold": 3.6, "best": best, "best_fluent": fluent,
            "best_ratio": 14.2 / 8.5, "best_fluent_ratio": 7.0 / 8.5, "beats_corpus": True, "fluent_beats_corpus": False,
            "front": [fluent, _point(["<|endoftext|>", " a"], [0.0, 9.0], 5.0), best], "forward_evaluations": 1234, "steps": 10}


def _nasty_latent(i: int) -> dict:
    rec = _full_latent(i)
    acts = [1.0, 2.0, 8.0, 3.0, 0.5, 4.0]
    rec["top_examples"] = [_ex(NASTY, acts, 2, document="<i>doc</i> & \"co\"")]
    rec["uniform_examples"] = [{"bin": [0.0, 1.0], "count": 3, **_ex(NASTY, acts, 0)}]
    rec["logit_lens"]["top"] = [[t, 1.0] for t in NASTY]
    rec["ablated_text"] = [{"example": 0, "tokens": NASTY, "target": 2, "base": 8.0, "change": [-1.0, 2.0], "relative": [-0.1, 0.2]}]
    rec["inputs"]["best"]["tokens"] = NASTY
    rec["inputs"]["best"]["acts"] = acts
    rec["inputs"]["front"][1]["text"] = "".join(NASTY)
    return rec


def latents() -> list[dict]:
    bare = {"latent": 12}
    partial = {"latent": 40, "frequency": 0.02, "max": 3.0, "top_examples": [_ex(["a", " b"], [3.0, 1.0], 0)],
               "uniform_examples": None, "max_inputs": {"exhaustive": [["a", 3.3]]}, "inputs": None}
    return [_full_latent(3), _nasty_latent(7), bare, partial]


class Parsed(HTMLParser):
    """Every start tag with its attributes, every script's body, and all text (entities resolved)."""

    def __init__(self, text: str):
        super().__init__(convert_charrefs=True)
        self.tags, self.scripts, self.data, self._in_script = [], [], [], False
        self.feed(text)
        self.close()

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))
        self._in_script = tag == "script"

    def handle_endtag(self, tag):
        self._in_script = False

    def handle_data(self, data):
        (self.scripts if self._in_script else self.data).append(data)

    def find(self, tag, **attrs):
        return [a for t, a in self.tags if t == tag and all(a.get(k.rstrip("_")) == v for k, v in attrs.items())]

    @property
    def text(self):
        return "".join(self.data)


def parse(path: Path) -> Parsed:
    return Parsed(path.read_text(encoding="utf-8"))


@pytest.fixture
def site(tmp_path):
    return write_dashboard(tmp_path / "dash", RUN, latents())


def test_pages_index_and_marker(site):
    names = sorted(p.name for p in site.iterdir())
    assert names == ["dashboard.json", "index.html", "latent-12.html", "latent-3.html", "latent-40.html", "latent-7.html", "style.css"]
    index = parse(site / "index.html")
    rows = index.find("tr", class_="latent-row")
    assert [r["data-latent"] for r in rows] == ["3", "7", "12", "40"]
    assert [a["href"] for a in index.find("a")] == ["latent-3.html", "latent-7.html", "latent-12.html", "latent-40.html"]
    for value in ("smollm2-135m", "runs/sae-l2", "3f9a0c1d", "pile-10k", "1,000,000", "torch: 2.13.0"):
        assert value in index.text
    assert index.find("link", rel="stylesheet", href="style.css")
    marker = json.loads((site / "dashboard.json").read_text(encoding="utf-8"))
    assert marker["run"] == RUN
    assert [(m["latent"], m["frequency"], m["max"]) for m in marker["latents"]] == [(3, 0.001234, 8.5), (7, 0.001234, 8.5), (12, None, None), (40, 0.02, 3.0)]
    # No resource from anywhere but the folder itself.
    for page in site.glob("*.html"):
        for tag, attrs in parse(page).tags:
            for key in ("src", "href"):
                assert not attrs.get(key, "").partition("#")[0].startswith(("http:", "https:", "//")), (page, tag, attrs)


def test_latent_page_sections(site):
    page = parse(site / "latent-3.html")
    assert len(page.find("div", class_="example", **{"data-kind": "top"})) == 3
    assert len(page.find("div", class_="example", **{"data-kind": "uniform"})) == 4
    assert len(page.find("div", class_="example", **{"data-kind": "ablated"})) == 2
    assert len(page.find("div", class_="example", **{"data-kind": "direction"})) == 1
    assert len(page.find("rect")) == 9  # one bar per histogram bin
    assert "not computed" not in page.text
    # Shading: the strongest token of the latent is fully shaded, the example token outlined.
    targets = [a for t, a in page.tags if t == "span" and a.get("class") == "tok target"]
    top_target = next(a for a in targets if "8.5" in a["title"])  # (the searched inputs' last tokens come first)
    assert top_target["style"] == "background:rgba(255,128,0,1.000)"
    assert any(a.get("style") == "background:rgba(220,38,38,0.730)" for t, a in page.tags)  # ablated: red by |relative|
    assert "↵" in page.text and "·Kinder" in page.text  # whitespace made visible
    assert "inputs that maximize the latent" in page.text and "14.2" in page.text
    # The searched inputs: both shaded by activation, the best marked as beating every corpus example
    # (14.2 >= 8.5), the fluent one not (7.0); the front as an SVG with the corpus windows.
    best = page.find("div", class_="example", **{"data-kind": "best-input"})
    fluent = page.find("div", class_="example", **{"data-kind": "best-fluent-input"})
    assert [b["data-beats"] for b in best] == ["true"] and [f["data-beats"] for f in fluent] == ["false"]
    assert page.text.count("beats every corpus example") == 1
    assert any(a.get("style") == "background:rgba(255,128,0,1.000)" and "14.2" in a.get("title", "") for t, a in page.tags)
    assert len(page.find("circle", class_="point")) == 3 and len(page.find("circle", class_="window")) == 3
    assert page.find("polyline", class_="front") and page.find("line", class_="corpus-max")
    assert page.find("line", class_="threshold")
    nav = {a["rel"]: a["href"] for a in page.find("a") if "rel" in a}
    assert nav == {"next": "latent-7.html"}
    assert parse(site / "latent-12.html").find("a", rel="prev", href="latent-7.html")


def test_missing_sections_say_not_computed(site):
    bare = parse(site / "latent-12.html")
    assert bare.text.count("not computed") == 8  # histogram, inputs, top, uniform, logit lens, ablated, direction, tokens
    assert "latent 12" in bare.text.lower()
    partial = parse(site / "latent-40.html")
    assert len(partial.find("div", class_="example", **{"data-kind": "top"})) == 1
    assert partial.text.count("not computed") == 6  # ... and the searched inputs
    assert "not computed" in parse(site / "index.html").text  # latent 12's logit lens


def test_nasty_tokens_are_escaped(site):
    for name in ("latent-7.html", "index.html"):
        page = parse(site / name)
        ours = [dashboard.SORT_SCRIPT] if name == "index.html" else []  # the index sorts its table
        assert [t for t, _ in page.tags if t in ("script", "img", "i")] == ["script"] * (1 + len(ours)), name  # ours only
        assert {t for t, _ in page.tags} <= TAGS, name  # well-formed: no tag broken by a token's text
        assert page.scripts == [x.removeprefix("<script>").removesuffix("</script>") for x in ours + [dashboard.SCRIPT]]
        assert not any("onmouseover" in attrs or "onerror" in attrs for _, attrs in page.tags)
        assert "<script>window.__pwned = 1</script>" in page.text.replace("·", " ")
    page = parse(site / "latent-7.html")
    assert "&amp;" in page.text and "<i>doc</i> & \"co\"" in page.text
    titles = [a["title"] for t, a in page.tags if t == "span" and "title" in a]
    assert repr(NASTY[2]) + ": activation 8" in titles  # the quote-laden token survives into its title intact
    assert "↵↵" in page.text


def test_versions_added_when_missing(tmp_path):
    run = {k: v for k, v in RUN.items() if k != "versions"}
    out = write_dashboard(tmp_path / "d", run, [{"latent": 0}])
    assert "featopt" in json.loads((out / "dashboard.json").read_text())["run"]["versions"]


@pytest.mark.parametrize("bad", [[{"latent": "../x"}], [{"latent": 1}, {"latent": 1}], [{"latent": -1}], [{"frequency": 0.1}]])
def test_bad_latent_records(tmp_path, bad):
    with pytest.raises(FeatoptError, match="'latent' index"):
        write_dashboard(tmp_path / "d", RUN, bad)
    assert list(tmp_path.iterdir()) == []


def test_foreign_folder_and_file_refused_untouched(tmp_path):
    foreign = tmp_path / "notes"
    foreign.mkdir()
    (foreign / "thesis.txt").write_text("precious")
    with pytest.raises(FeatoptError, match="not a featopt dashboard.*give a new folder or an old dashboard"):
        write_dashboard(foreign, RUN, latents())
    assert [p.name for p in foreign.iterdir()] == ["thesis.txt"] and (foreign / "thesis.txt").read_text() == "precious"
    file = tmp_path / "file.html"
    file.write_text("mine")
    with pytest.raises(FeatoptError, match="is a file"):
        write_dashboard(file, RUN, latents())
    assert file.read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file.html", "notes"]


def test_empty_folder_and_old_dashboard_replaced(tmp_path):
    out = tmp_path / "dash"
    out.mkdir()
    write_dashboard(out, RUN, latents())
    assert (out / "latent-7.html").exists()
    write_dashboard(out, {**RUN, "seed": 5}, [{"latent": 99}])
    assert sorted(p.name for p in out.iterdir()) == ["dashboard.json", "index.html", "latent-99.html", "style.css"]
    assert json.loads((out / "dashboard.json").read_text())["run"]["seed"] == 5
    assert [p.name for p in tmp_path.iterdir()] == ["dash"]  # neither the new site's temp nor the old one is left
    assert oct(out.stat().st_mode & 0o777) == oct(0o777 & ~_umask())


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_error_mid_write_leaves_nothing_half_written(tmp_path, monkeypatch):
    real, calls = dashboard._latent_page, []

    def failing(*args):
        calls.append(1)
        if len(calls) == 2:
            raise OSError("disk full")
        return real(*args)

    monkeypatch.setattr(dashboard, "_latent_page", failing)
    with pytest.raises(OSError, match="disk full"):
        write_dashboard(tmp_path / "new", RUN, latents())
    assert list(tmp_path.iterdir()) == []

    monkeypatch.setattr(dashboard, "_latent_page", real)
    old = write_dashboard(tmp_path / "old", RUN, latents())
    before = {p.name: p.read_bytes() for p in old.iterdir()}
    calls.clear()
    monkeypatch.setattr(dashboard, "_latent_page", failing)
    with pytest.raises(OSError, match="disk full"):
        write_dashboard(old, {**RUN, "seed": 9}, latents())
    assert {p.name: p.read_bytes() for p in old.iterdir()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["old"]


def test_in_headless_chromium(site, tmp_path):
    folders = [tmp_path]
    if os.environ.get("FEATOPT_SCREENSHOTS"):
        folders.append(Path(os.environ["FEATOPT_SCREENSHOTS"]))
        folders[-1].mkdir(parents=True, exist_ok=True)

    def screenshot(page, name):
        for folder in folders:
            page.screenshot(path=str(folder / name), full_page=True)
        assert (tmp_path / name).stat().st_size > 10_000

    with browser_page() as (page, messages, errors):
        page.goto((site / "index.html").as_uri())
        assert page.locator("tr.latent-row").count() == len(latents())
        screenshot(page, "index.png")
        # Sorting by a ratio column: highest first, latents without inputs last; again: the other way.
        page.click('button.sort[data-column="4"]')
        order = page.eval_on_selector_all("tr.latent-row", "rows => rows.map(r => r.dataset.latent)")
        assert order[:2] in (["3", "7"], ["7", "3"]) and set(order[2:]) == {"12", "40"}
        page.click('button.sort[data-column="1"]')
        page.click('button.sort[data-column="1"]')  # frequency, ascending: missing (12) first
        assert page.eval_on_selector_all("tr.latent-row", "rows => rows.map(r => r.dataset.latent)")[0] == "12"

        page.click('a[href="latent-3.html"]')
        page.wait_for_load_state()
        assert page.url.endswith("/latent-3.html")
        assert page.locator('.example[data-kind="top"]').count() == 3
        assert page.locator('.example[data-kind="uniform"]').count() == 4
        # The stylesheet loaded from file:// and the shading and outline are drawn.
        target = page.locator('.example[data-kind="top"] .tok.target').first
        assert target.evaluate("e => getComputedStyle(e).outlineStyle") == "solid"
        assert target.evaluate("e => getComputedStyle(e).backgroundColor") == "rgb(255, 128, 0)"
        assert page.locator("svg.hist rect").count() == 9
        assert page.locator("svg.front circle.point").count() == 3
        assert page.locator('.example[data-kind="best-input"] .beats').is_visible()
        assert page.locator("svg.front polyline.front").evaluate("e => getComputedStyle(e).fill") == "none"
        screenshot(page, "latent-3.png")

        page.keyboard.press("ArrowRight")  # the one bit of script: arrow keys step through latents
        page.wait_for_url("**/latent-7.html")
        assert page.evaluate("window.__pwned") is None  # no token ran as script
        assert "<script>window.__pwned = 1</script>" in page.locator('.example[data-kind="top"]').first.inner_text().replace("·", " ")
        screenshot(page, "latent-7.png")
    assert errors == []
    assert [m for m in messages if m[0] == "error"] == []
