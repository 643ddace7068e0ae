"""`nanomoe experts`: statistics against known routing and an independent count, padding left out,
token pieces that join to the text, and report.html in a real headless Chromium (no console errors,
no network, coloured tokens that follow the layer selector)."""

import json

import numpy as np
import pytest
import torch

from nanomoe.analysis import TokenText, analyze_experts, write_report
from nanomoe.cli import main
from nanomoe.data import load_data_tokenizer, prepare_data, read_meta
from nanomoe.data.loader import BatchLoader
from nanomoe.model import GPT, IGNORE_INDEX
from nanomoe.presets import get_preset
from nanomoe.training import checkpoint as ckpt

N_EXPERTS = 8
RIGGED = 1  # the layer whose routing the fixture fixes


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return prepare_data("builtin:0.1", tmp_path_factory.mktemp("data") / "stories", vocab_size=400, progress=False)


@pytest.fixture(scope="module")
def moe_run(data_dir, tmp_path_factory):
    """A top-2 MoE over 8 experts whose second layer is rigged through the router's selection bias:
    expert 0 is chosen for every token (overloaded, exactly half the assignments), expert 7 never (dead)."""
    torch.manual_seed(0)
    model = GPT(get_preset("debug", vocab_size=400, block_size=128, n_experts=N_EXPERTS, top_k=2)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():  # sharper routing than the default init
            if "router.gate" in name:
                p.normal_(0, 0.5)
        bias = model.blocks[RIGGED].ffn.router.selection_bias
        bias[0], bias[N_EXPERTS - 1] = 100.0, -100.0
    run = tmp_path_factory.mktemp("runs") / "moe"
    ckpt.save_checkpoint(
        run, ckpt.checkpoint_name(5), model_state=model.state_dict(), model_config=model.config,
        trainer_state={"step": 5, "data_dir": str(data_dir)},
        tokenizer_json=load_data_tokenizer(data_dir).to_json_str(), data_meta=read_meta(data_dir),
        pointers={"latest": {}},
    )
    return run


@pytest.fixture(scope="module")
def analysis(moe_run, data_dir):
    return analyze_experts(ckpt.load_checkpoint(moe_run), data_dir, mode="documents", batch_size=3, n_samples=3,
                           max_batches=None, progress=False)


def test_load_fractions_sum_to_one_and_rigged_experts_are_found(analysis):
    layers = analysis["layers"]
    assert [layer["layer"] for layer in layers] == [0, 1]
    for layer in layers:
        assert sum(layer["load_fractions"]) == pytest.approx(1.0, abs=1e-12)
        assert sum(layer["tokens_per_expert"]) == 2 * layer["tokens"]
        co = np.array(layer["coselection"])
        np.testing.assert_allclose(co, co.T)
        np.testing.assert_allclose(np.diag(co), 2 * np.array(layer["load_fractions"]), rtol=1e-9)
        assert 0 <= layer["routing_entropy_normalized"] <= 1 and 0 < layer["router_confidence"] <= 1
        assert sum(layer["confidence_histogram"]["fractions"]) == pytest.approx(1.0)
    rigged = layers[RIGGED]
    assert rigged["load_fractions"][0] == 0.5 and rigged["dead_experts"] == [N_EXPERTS - 1]
    assert rigged["overloaded_experts"] == [0] and rigged["experts"][N_EXPERTS - 1]["top_tokens"] == []
    # every token's pair includes expert 0, so the top pair holds it
    assert 0 in rigged["top_pairs"][0]["experts"]
    assert all(row["share"] == 1.0 for row in rigged["experts"][0]["top_tokens"])
    free = layers[1 - RIGGED]
    assert free["dead_experts"] == [] and free["load_fractions"][0] < 0.5
    assert 1 / N_EXPERTS <= free["router_confidence"] <= 1  # the first choice is the most probable expert


def test_counts_match_an_independent_count_without_padding(analysis, moe_run, data_dir):
    model = ckpt.load_checkpoint(moe_run).model
    loader = BatchLoader(data_dir, "val", 3, 128, mode="documents")
    counts = np.zeros((2, N_EXPERTS, 400), dtype=np.int64)  # (layer, expert, token)
    n_real = 0
    with torch.no_grad():
        for x, y in loader.eval_batches(3):
            out = model(x)
            real = (y != IGNORE_INDEX).reshape(-1).numpy()
            ids = x.reshape(-1).numpy()[real]
            n_real += int(real.sum())
            for layer, stats in enumerate(out.moe):
                chosen = stats.expert_indices.numpy()[real]  # (n, 2)
                for k in range(chosen.shape[1]):
                    np.add.at(counts[layer], (chosen[:, k], ids), 1)
    assert analysis["evaluation"]["tokens"] == n_real < loader.num_eval_batches(3) * 3 * 128
    for layer, report in enumerate(analysis["layers"]):
        assert report["tokens"] == n_real
        assert report["tokens_per_expert"] == counts[layer].sum(axis=1).tolist()
        for expert in report["experts"]:
            for row in expert["top_tokens"]:
                assert row["count"] == counts[layer, expert["expert"], row["id"]]
            best = expert["top_tokens"][0]["count"] if expert["top_tokens"] else 0
            assert best == counts[layer, expert["expert"]].max()


def test_samples_are_whole_documents_with_pieces_that_join_to_the_text(analysis, data_dir):
    tok = load_data_tokenizer(data_dir)
    loader = BatchLoader(data_dir, "val", 1, 1, mode="documents")
    assert len(analysis["samples"]) == 3
    for sample, start, end in zip(analysis["samples"], loader.doc_starts, loader.doc_ends):
        expected_ids = loader.tokens[start:end - 1].tolist()[:127]  # the story without its EOT, cut to fit
        assert sample["ids"] == expected_ids
        assert "".join(sample["tokens"]) == tok.decode(expected_ids) and len(sample["tokens"]) == len(expected_ids)
        for route in sample["layers"]:
            assert len(route["experts"]) == len(expected_ids) and all(len(e) == 2 for e in route["experts"])
        assert all(p1 >= p2 for p1, p2 in sample["layers"][1 - RIGGED]["probs"])  # first choice first
        assert all(e[0] == 0 for e in sample["layers"][RIGGED]["experts"])


def test_token_text_keeps_multibyte_characters_whole(data_dir):
    tok = load_data_tokenizer(data_dir)
    text = "Zoë ate a crêpe 🍰 — naïve café!"
    ids = tok.encode(text)
    pieces = TokenText(tok).pieces(ids)
    assert "".join(pieces) == text and len(pieces) == len(ids)
    assert "\ufffd" not in "".join(pieces)
    assert TokenText(tok).name(tok.encode(" the")[0]) == " the"


def test_cli_writes_the_report_and_leaves_other_files_alone(moe_run, data_dir, tmp_path, capsys):
    out = tmp_path / "report"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    assert main(["experts", "--checkpoint", str(moe_run), "--data", str(data_dir), "--out", str(out),
                 "--max-batches", "2", "--samples", "2", "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "load_cv" in printed and "report.html" in printed
    assert (out / "notes.txt").read_text() == "mine"
    report = json.loads((out / "experts.json").read_text())
    assert len(report["samples"]) == 2 and report["evaluation"]["batches"] == 2
    for name in ("expert_load.png", "coselection.png", "router_confidence.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    page = (out / "report.html").read_text()
    assert "http://" not in page and "https://" not in page and "<link" not in page and "<script src" not in page
    assert page.count("data:image/png;base64,") == 3


def test_dense_checkpoints_are_refused(data_dir, tmp_path, capsys):
    model = GPT(get_preset("debug-dense", vocab_size=400, block_size=64))
    ckpt.save_checkpoint(tmp_path / "dense", "step-00000001", model_state=model.state_dict(),
                         model_config=model.config, trainer_state={"step": 1, "data_dir": str(data_dir)},
                         tokenizer_json=load_data_tokenizer(data_dir).to_json_str(), pointers={"latest": {}})
    assert main(["experts", "--checkpoint", str(tmp_path / "dense"), "--out", str(tmp_path / "r")]) == 1
    assert "dense model" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# report.html in a real browser (Playwright driving the system Chromium: tests/conftest.py)


@pytest.mark.browser
def test_report_in_headless_chromium(browser_page, analysis, tmp_path):
    # a hostile story: token texts that would break out of the page if they were pasted in as HTML
    hostile = ["</script><script>window.pwned=1</script>", "<img src=http://example.invalid/x.png>", " & ",
               "\u2028 ok"]
    routes = [{"experts": layer["experts"][:4], "probs": layer["probs"][:4]}
              for layer in analysis["samples"][0]["layers"]]
    data = {**analysis, "samples": analysis["samples"] + [{"ids": [1, 2, 3, 4], "tokens": hostile, "layers": routes}]}
    page = write_report(data, tmp_path / "report")["html"]

    browser = browser_page.page
    browser.goto(page.resolve().as_uri())

    samples = data["samples"]
    state = browser.evaluate("""() => {
        const toks = [...document.querySelectorAll('.story .tok')];
        return {n: toks.length,
                colours: [...new Set(toks.map(t => getComputedStyle(t).backgroundColor))],
                first: [...document.querySelectorAll('.story[data-sample="0"] .tok')].map(t => +t.dataset.e),
                hostile: document.querySelector('.story[data-sample="3"]').textContent,
                options: document.querySelectorAll('#layer-select option').length,
                swatches: document.querySelectorAll('#legend .swatch').length,
                images: [...document.images].filter(i => i.complete && i.naturalWidth > 0).length,
                pwned: window.pwned === 1};
    }""")
    assert state["n"] == sum(len(s["tokens"]) for s in samples)
    assert len(state["colours"]) >= 3 and "rgba(0, 0, 0, 0)" not in state["colours"]
    assert state["first"] == [e[0] for e in samples[0]["layers"][0]["experts"]]
    assert state["hostile"] == "".join(hostile) and not state["pwned"]
    assert state["options"] == 2 and state["swatches"] == N_EXPERTS and state["images"] == 3

    # clicking an expert in the legend highlights its tokens: all the others are dimmed
    dimmed = browser.evaluate("""() => {
        document.querySelector('#legend .swatch[data-e="3"]').click();
        return document.querySelectorAll('.story .tok.dim').length;
    }""")
    assert dimmed == sum(e[0] != 3 for s in samples for e in s["layers"][0]["experts"]) < state["n"]
    # the layer selector recolours the stories with the other layer's routing (all expert 0 when rigged)
    layer1 = browser.evaluate("""() => {
        const select = document.getElementById('layer-select');
        select.value = '1';
        select.dispatchEvent(new Event('change'));
        const toks = [...document.querySelectorAll('.story .tok')];
        return {first: [...document.querySelectorAll('.story[data-sample="0"] .tok')].map(t => +t.dataset.e),
                colours: [...new Set(toks.map(t => getComputedStyle(t).backgroundColor))].length};
    }""")
    assert layer1["first"] == [e[0] for e in samples[0]["layers"][1]["experts"]] != state["first"]
    assert layer1["colours"] == 1

    assert browser_page.errors == []
    assert [u for u in browser_page.requests if not u.startswith(("data:", page.resolve().as_uri()))] == []
