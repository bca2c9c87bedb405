"""The attribution graph's HTML page and PNG: every kept node and link drawn with its numbers in its
tooltip, tokens escaped, features linked to their dashboards, and the page's script in a real
headless browser; the PNG a real, non-blank image."""

from __future__ import annotations

import copy
import re
from html.parser import HTMLParser

import pytest

from featopt.dictionaries.dashboard import write_dashboard
from featopt.attribution import page as graph_page
from featopt.attribution.files import graph_json
from featopt.attribution.page import write_graph_page
from featopt.attribution.plot import MAX_LINKS, write_graph_png
from featopt.attribution.pruning import prune, scores
from tests.browser import browser_page

NASTY = ["<script>window.__pwned = 1</script>", "&amp;", '" onmouseover="window.__pwned=2', "'", "\n\n", " <img src=x onerror=window.__pwned=3>"]
TAGS = {"html", "head", "meta", "title", "style", "body", "script", "h1", "h2", "p", "b", "div", "span", "dl", "dt", "dd", "ol", "li",
        "table", "thead", "tbody", "tr", "th", "td", "a", "svg", "g", "line", "text", "circle", "rect", "polygon"}
VOID = {"meta", "link", "br", "img", "input", "hr"}


@pytest.fixture(scope="module")
def doc(setup, graph):
    decode = lambda t: setup[0].tokenizer.decode([t])  # noqa: E731
    return graph_json(graph, prune(graph), decode, slug="cat", scan="tiny", transcoders=["a", "b", "c"], node_threshold=0.8)


@pytest.fixture(scope="module")
def summary(setup, graph):
    replacement, completeness = scores(graph)
    return {"model": "tiny-llama", "replacement_score": replacement, "completeness_score": completeness,
            "logits": [{"token": setup[0].tokenizer.decode([int(t)]), "id": int(t), "probability": float(p)}
                       for t, p in zip(graph.logit_ids, graph.logit_probs)]}


@pytest.fixture(scope="module")
def nasty(doc, summary):
    """The graph with NASTY tokens in its prompt, metadata, model and logits."""
    bad = copy.deepcopy(doc)
    bad["metadata"]["prompt_tokens"][:len(NASTY)] = NASTY
    bad["metadata"]["prompt"] = "".join(bad["metadata"]["prompt_tokens"])
    bad["metadata"]["slug"], bad["metadata"]["transcoder_list"] = NASTY[0], NASTY[2:4]
    for node in bad["nodes"]:
        node["clerp"] = f'Output "{NASTY[5]}" (p=0.1)' if node["feature_type"] == "logit" else NASTY[2]  # features' labels
    return bad, {**summary, "model": NASTY[5], "logits": [{**row, "token": NASTY[0]} for row in summary["logits"]]}


class Tree(HTMLParser):
    """The page as elements (tag, attrs, children, text of its own), entities resolved."""

    def __init__(self, text: str):
        super().__init__(convert_charrefs=True)
        self.root = {"tag": "", "attrs": {}, "children": [], "text": ""}
        self.stack, self.all, self.pieces = [self.root], [], []
        self.feed(text)
        self.close()

    def handle_starttag(self, tag, attrs):
        element = {"tag": tag, "attrs": dict(attrs), "children": [], "text": ""}
        self.stack[-1]["children"].append(element)
        self.all.append(element)
        if tag not in VOID:
            self.stack.append(element)

    def handle_endtag(self, tag):
        assert self.stack[-1]["tag"] == tag, f"</{tag}> closes <{self.stack[-1]['tag']}>"
        self.stack.pop()

    def handle_data(self, data):
        self.stack[-1]["text"] += data
        if self.stack[-1]["tag"] not in ("script", "style"):
            self.pieces.append(data)

    def find(self, tag, cls=None):
        return [e for e in self.all if e["tag"] == tag and (cls is None or cls in e["attrs"].get("class", "").split())]

    @staticmethod
    def title(element) -> str:
        return next(c["text"] for c in element["children"] if c["tag"] == "title")

    @property
    def text(self):
        """All the text outside scripts and styles, in document order."""
        return "".join(self.pieces)


def test_every_node_and_link_is_drawn_with_its_numbers(doc, summary, tmp_path):
    path = write_graph_page(doc, tmp_path / "graph.html", summary=summary)
    page = Tree(path.read_text(encoding="utf-8"))
    assert len(page.stack) == 1  # every element closed
    assert {e["tag"] for e in page.all} <= TAGS
    nodes, edges = page.find("g", "node"), page.find("line", "edge")
    assert len(nodes) == len(doc["nodes"]) and len(edges) == len(doc["links"]) > 0
    assert sorted(n["attrs"]["data-node"] for n in nodes) == sorted(n["node_id"] for n in doc["nodes"])
    assert sorted((e["attrs"]["data-source"], e["attrs"]["data-target"]) for e in edges) == sorted(
        (k["source"], k["target"]) for k in doc["links"])
    # The strongest link: its tooltip names both ends and its weight, its colour its sign, and it is
    # drawn at full width (widths and opacities go by |weight| over the largest).
    strong = max(doc["links"], key=lambda k: abs(k["weight"]))
    edge = next(e for e in edges if (e["attrs"]["data-source"], e["attrs"]["data-target"]) == (strong["source"], strong["target"]))
    tooltip = Tree.title(edge)
    assert tooltip.startswith(f'{strong["source"]} → {strong["target"]}: weight ')
    assert float(re.search(r"weight (\S+)$", tooltip)[1]) == pytest.approx(strong["weight"], rel=1e-3)
    assert ("neg" if strong["weight"] < 0 else "pos") in edge["attrs"]["class"].split()
    assert float(edge["attrs"]["stroke-width"]) == 3.0
    weak = min(doc["links"], key=lambda k: abs(k["weight"]))
    assert float(next(e for e in edges if e["attrs"]["data-source"] == weak["source"]
                      and e["attrs"]["data-target"] == weak["target"])["attrs"]["stroke-width"]) < 3.0
    # A feature's tooltip: type, layer, position and its token, latent, activation, influence.
    feature = next(n for n in doc["nodes"] if n["feature_type"] == "cross layer transcoder")
    layer, latent, pos = feature["node_id"].split("_")
    tooltip = Tree.title(next(n for n in nodes if n["attrs"]["data-node"] == feature["node_id"]))
    token = doc["metadata"]["prompt_tokens"][int(pos)]
    assert tooltip.startswith(f"feature · layer {layer} · latent {latent} · position {pos} ({token!r})")
    assert float(re.search(r"activation (\S+)", tooltip)[1]) == pytest.approx(feature["activation"], rel=1e-3)
    assert float(re.search(r"influence (\S+)", tooltip)[1]) == pytest.approx(feature["influence"], rel=1e-3)
    kinds = {n["node_id"]: n["feature_type"] for n in doc["nodes"]}
    shapes = {"cross layer transcoder": "circle", "mlp reconstruction error": "rect", "embedding": "polygon", "logit": "polygon"}
    assert all(n["children"][0]["tag"] == shapes[kinds[n["attrs"]["data-node"]]] for n in nodes)
    assert len(page.find("g", "target")) == 1
    # The prompt's tokens under the columns; the header's scores and logits.
    assert [e["text"] for e in page.find("text", "token")] == [graph_page.visible(t) for t in doc["metadata"]["prompt_tokens"]]
    text = page.text
    assert f'{summary["replacement_score"]:.3g}' in text and f'{summary["completeness_score"]:.3g}' in text
    assert "tiny-llama" in text and f'p = {max(r["probability"] for r in summary["logits"]):.3g} (target)' in text


def test_the_table_lists_the_nodes_most_influential_first(doc, tmp_path):
    page = Tree(write_graph_page(doc, tmp_path / "graph.html").read_text(encoding="utf-8"))
    rows = [r["attrs"]["data-node"] for r in page.find("tr") if "data-node" in r["attrs"]]
    influence = {n["node_id"]: n["influence"] for n in doc["nodes"]}
    assert sorted(rows) == sorted(influence) and [influence[r] for r in rows] == sorted(influence.values())
    assert "–" in page.find("dd")[3]["text"]  # no summary: the scores print as missing


def test_features_link_to_their_latents_in_the_dashboard_of_their_layer(doc, tmp_path):
    page = Tree(write_graph_page(doc, tmp_path / "graph.html", dashboards={0: "dash 0/"}).read_text(encoding="utf-8"))
    layer0 = {n["node_id"].split("_")[1] for n in doc["nodes"] if n["feature_type"] == "cross layer transcoder" and n["layer"] == "0"}
    links = [a for a in page.find("a") if a["children"] and a["children"][0]["tag"] == "g"]
    assert sorted(a["attrs"]["href"] for a in links) == sorted(f"dash%200/latent-{i}.html" for i in layer0) and layer0
    assert all(a["children"][0]["attrs"]["data-node"].startswith("0_") for a in links)
    in_table = [a for a in page.find("a") if not a["children"]]
    assert sorted(a["text"] for a in in_table) == sorted(layer0)
    assert not [a for a in Tree(write_graph_page(doc, tmp_path / "plain.html").read_text()).find("a")]


def test_nasty_tokens_are_escaped(nasty, tmp_path):
    bad, summary = nasty
    page = Tree(write_graph_page(bad, tmp_path / "graph.html", summary=summary).read_text(encoding="utf-8"))
    assert {e["tag"] for e in page.all} <= TAGS and len(page.stack) == 1  # no tag broken by a token's text
    assert [e["text"] for e in page.find("script")] == [graph_page.SCRIPT.removeprefix("<script>").removesuffix("</script>")]
    assert not page.find("img") and not any(k.startswith("on") for e in page.all for k in e["attrs"])
    text = page.text.replace("·", " ")
    assert "<script>window.__pwned = 1</script>" in text and "<img src=x onerror=window.__pwned=3>" in text
    assert "&amp;" in page.text and "↵↵" in page.text
    assert repr(NASTY[0]) in Tree.title(page.find("g", "logit")[0])  # the logit's token from summary.json's logits, by id
    feature = page.find("g", "feature")[0]
    assert NASTY[2] in Tree.title(feature) and NASTY[2] in [e["text"] for e in page.find("td")]  # its label, whole
    logit = next(n for n in bad["nodes"] if n["feature_type"] == "logit")
    assert graph_page.logit_token(logit) == NASTY[5]  # without a summary: from the node's clerp


def test_in_headless_chromium(nasty, tmp_path):
    bad, summary = nasty
    features = [n for n in bad["nodes"] if n["feature_type"] == "cross layer transcoder" and n["layer"] == "0"]
    latents = sorted({int(n["node_id"].split("_")[1]) for n in features})
    write_dashboard(tmp_path / "dash0", {"model": "tiny-llama", "versions": {}}, [{"latent": i} for i in latents])
    path = write_graph_page(bad, tmp_path / "graph.html", summary=summary, dashboards={0: "dash0"})
    # A node with some links but not all: hovering it brings them out and fades the others.
    degree = {n["node_id"]: 0 for n in bad["nodes"]}
    for k in bad["links"]:
        degree[k["source"]] += 1
        degree[k["target"]] += 1
    node = max((n for n in features if degree[n["node_id"]] < len(bad["links"])), key=lambda n: degree[n["node_id"]])
    mine = [k for k in bad["links"] if node["node_id"] in (k["source"], k["target"])]
    other = next(k for k in bad["links"] if node["node_id"] not in (k["source"], k["target"]))
    edge = 'line.edge[data-source="{source}"][data-target="{target}"]'
    with browser_page() as (page, messages, errors):
        page.goto(path.as_uri())
        assert page.locator("svg.graph g.node").count() == len(bad["nodes"])
        assert page.locator("svg.graph line.edge").count() == len(bad["links"])
        assert page.evaluate("window.__pwned") is None  # no token ran as script
        opacity = lambda k: float(page.locator(edge.format(**k)).evaluate("e => getComputedStyle(e).opacity"))  # noqa: E731
        assert opacity(other) == 1.0
        page.hover(f'g.node[data-node="{node["node_id"]}"]')
        assert "focus" in page.locator("svg.graph").get_attribute("class")
        assert opacity(other) < 0.1 and "hl" not in page.locator(edge.format(**other)).get_attribute("class")
        assert all(opacity(k) == 1.0 and "hl" in page.locator(edge.format(**k)).get_attribute("class").split() for k in mine)
        page.screenshot(path=str(tmp_path / "graph.png"), full_page=True)
        assert (tmp_path / "graph.png").stat().st_size > 10_000
        page.mouse.move(0, 0)  # leaving the node: every link back
        assert opacity(other) == 1.0
        page.click(f'g.node[data-node="{node["node_id"]}"]')  # a feature with a dashboard: its latent page
        latent = node["node_id"].split("_")[1]
        page.wait_for_url(f"**/dash0/latent-{latent}.html")
        assert page.locator("h1").inner_text() == f"Latent {latent}"
    assert errors == [] and [m for m in messages if m[0] == "error"] == []


def _png_pixels(path):
    import matplotlib.image

    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    return matplotlib.image.imread(str(path))


def test_the_png_is_a_real_picture_and_leaves_no_figure_open(doc, summary, nasty, tmp_path):
    import matplotlib.pyplot as plt

    for name, (d, s) in {"graph": (doc, summary), "nasty": nasty}.items():
        pixels = _png_pixels(write_graph_png(d, tmp_path / f"{name}.png", summary=s))
        height, width = pixels.shape[:2]
        assert width >= 900 and height >= 500 and pixels[..., :3].std() > 0.05  # not blank
        assert plt.get_fignums() == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["graph.png", "nasty.png"]  # no temporary file left beside them


def test_a_big_graph_draws_only_its_strongest_links(monkeypatch, tmp_path):
    import featopt.attribution.plot as plot

    layers, positions, nodes, links = 12, 20, [], []
    for pos in range(positions):
        nodes.append({"node_id": f"E_{pos}_{pos}", "layer": "E", "ctx_idx": pos, "feature_type": "embedding", "influence": 0.5})
        nodes += [{"node_id": f"{layer}_{latent}_{pos}", "layer": str(layer), "ctx_idx": pos, "activation": 1.0,
                   "feature_type": "cross layer transcoder", "influence": 0.5} for layer in range(layers) for latent in range(4)]
    nodes.append({"node_id": f"{layers + 1}_7_{positions - 1}", "feature": 7, "layer": str(layers + 1), "ctx_idx": positions - 1,
                  "feature_type": "logit", "token_prob": 0.4, "is_target_logit": True, "clerp": 'Output "x" (p=0.400)', "influence": 1.0})
    for i, node in enumerate(nodes[:-1]):  # 981 nodes: strong links to the next two, a weak one to the logit
        links += [{"source": node["node_id"], "target": nodes[j]["node_id"], "weight": (-1) ** j * j} for j in (i + 1, i + 2)
                  if j < len(nodes) - 1]
        links.append({"source": node["node_id"], "target": nodes[-1]["node_id"], "weight": 0.001 * i})
    doc = {"metadata": {"prompt_tokens": [f"$t{i}$" for i in range(positions)], "prompt": "$x$ " * 5}, "nodes": nodes, "links": links}
    kept = plot.strongest(links, MAX_LINKS)
    assert len(kept) == MAX_LINKS < len(links) and min(abs(k["weight"]) for k in kept) >= max(
        abs(k["weight"]) for k in links if k not in kept)
    figures = []
    monkeypatch.setattr(plot, "save_figure", lambda fig, plt, path: figures.append(fig) or path)
    write_graph_png(doc, tmp_path / "big.png")
    (ax,) = figures[0].axes
    assert len(ax.collections[0].get_segments()) == MAX_LINKS
    assert f"the strongest {MAX_LINKS:,} of {len(links):,} links drawn" in ax.get_title(loc="left").replace("\n", " ")
    monkeypatch.undo()
    pixels = _png_pixels(write_graph_png(doc, tmp_path / "big.png"))  # tokens with `$`: text, not mathtext
    assert pixels.shape[1] > 1500 and pixels[..., :3].std() > 0.05


def test_the_page_draws_only_the_strongest_links_of_a_big_graph_and_says_so(doc, monkeypatch, tmp_path):
    monkeypatch.setattr(graph_page, "MAX_PAGE_LINKS", 3)
    page = Tree(write_graph_page(doc, tmp_path / "graph.html").read_text(encoding="utf-8"))
    drawn = sorted((e["attrs"]["data-source"], e["attrs"]["data-target"]) for e in page.find("line", "edge"))
    strongest = sorted(doc["links"], key=lambda k: -abs(k["weight"]))[:3]
    assert drawn == sorted((k["source"], k["target"]) for k in strongest) and len(doc["links"]) > 3
    assert "the strongest 3 links drawn (all are in graph.json)" in page.text
