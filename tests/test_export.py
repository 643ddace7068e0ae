"""`nanomoe export --format hf`: transformers loads the folder, logits match to 1e-5 in fp32, greedy
generation gives the same tokens, the tokenizer gives the same ids; refusals and overwrite safety."""

import json

import pytest
import torch

from nanomoe.cli import main
from nanomoe.data import load_data_tokenizer, prepare_data, read_meta
from nanomoe.generation import generate
from nanomoe.hf import save_hf_tokenizer
from nanomoe.model import GPT
from nanomoe.presets import get_preset
from nanomoe.training import checkpoint as ckpt

transformers = pytest.importorskip("transformers")

PROMPTS = ["Once upon a time, there was a little", "The cat said: \"Hello!\" and ran away."]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return prepare_data("builtin:0.1", tmp_path_factory.mktemp("data") / "stories", vocab_size=400, progress=False)


def randomized(model: GPT, seed: int = 0) -> GPT:
    """Random weights everywhere (norms too), large enough that greedy decoding is not degenerate."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.uniform_(0.5, 1.5) if name.endswith("norm.weight") else p.normal_(0, 0.08)
    return model.eval()


def save_run(run_dir, model: GPT, data_dir):
    state = model.state_dict()
    if model.config.tie_embeddings:  # one copy of the shared matrix, as the trainer saves it
        del state["lm_head.weight"]
    ckpt.save_checkpoint(
        run_dir, ckpt.checkpoint_name(12), model_state=state, model_config=model.config,
        trainer_state={"step": 12, "tokens_seen": 1234, "best_val_loss": 3.5, "data_dir": str(data_dir)},
        tokenizer_json=load_data_tokenizer(data_dir).to_json_str(), data_meta=read_meta(data_dir),
        pointers={"latest": {}},
    )
    return run_dir


CASES = {
    "llama": ("LlamaForCausalLM", dict(preset="debug-dense", n_kv_head=2, tie_embeddings=True)),
    "mixtral": ("MixtralForCausalLM", dict(preset="debug", router="topk", n_kv_head=2)),
    # noisy top-k gating is training-only noise: at inference it is Mixtral's router
    "mixtral-noisy": ("MixtralForCausalLM", dict(preset="debug", router="noisy_topk", top_k=2)),
}


@pytest.mark.parametrize("case", list(CASES))
def test_export_loads_in_transformers_with_identical_logits_and_greedy_tokens(case, data_dir, tmp_path, capsys):
    arch, fields = CASES[case]
    fields = dict(fields)
    cfg = get_preset(fields.pop("preset"), vocab_size=400, block_size=96, **fields)
    model = randomized(GPT(cfg))
    run = save_run(tmp_path / "run", model, data_dir)
    out = tmp_path / "export"
    assert main(["export", "--checkpoint", str(run), "--format", "hf", "--out", str(out)]) == 0
    assert arch in capsys.readouterr().out
    assert {"config.json", "model.safetensors", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
            "README.md", "nanomoe_export.json"} <= {p.name for p in out.iterdir()}

    hf = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    tok = transformers.AutoTokenizer.from_pretrained(out)
    assert type(hf).__name__ == arch
    assert isinstance(tok, transformers.PreTrainedTokenizerFast)
    ours = ckpt.load_checkpoint(run)
    eot = ours.tokenizer.eot_id
    assert tok.bos_token_id == tok.eos_token_id == tok.pad_token_id == hf.generation_config.eos_token_id == eot
    for prompt in PROMPTS:
        ids = tok(prompt, return_tensors="pt").input_ids
        assert ids[0].tolist() == [eot] + ours.tokenizer.encode(prompt)  # <|endoftext|> in front, as in training
        with torch.no_grad():
            torch.testing.assert_close(hf(ids).logits, ours.model(ids).logits, atol=1e-5, rtol=0)
        expected = generate(ours.model, ids, 24, temperature=0, stop_id=eot)
        got = hf.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=24)
        assert got.tolist() == expected.tolist()
        assert got.shape[1] == ids.shape[1] + 24 or got[0, -1] == eot
        assert tok.decode(ids[0], skip_special_tokens=True) == prompt


def test_word_tokenizer_exports_to_the_same_ids(tmp_path):
    data = prepare_data("builtin:0.1", tmp_path / "word", vocab_size=300, tokenizer_kind="word", progress=False)
    ours = load_data_tokenizer(data)
    save_hf_tokenizer(ours, tmp_path / "tok", model_max_length=64)
    tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "tok")
    meta = read_meta(data)
    import numpy as np

    val = np.fromfile(data / "val.bin", dtype=meta["dtype"]).tolist()
    texts = [ours.decode(val[:600]), "Zoë's café: naïve  123\t€!  \n\nThe end<|endoftext|>next", "xyzzy qq"]
    for text in texts:
        expected = ours.encode(text)
        assert tok(text, add_special_tokens=False).input_ids == expected
        assert tok(text).input_ids == [ours.eot_id] + expected
        assert tok.decode(expected) == ours.decode(expected)
    assert ours.special_tokens["<|unknown|>"] in ours.encode(texts[1])  # the fallback was exercised


def test_models_without_hf_equivalent_are_refused_naming_what_is_needed(data_dir, tmp_path, capsys):
    cfg = get_preset("tiny-moe-classic", vocab_size=400, block_size=64, n_layer=2, n_embd=64, n_head=4,
                     expert_hidden=64)  # the NanoGPT-MoE project's recipe: learned positions, LayerNorm, ReLU, biases, noisy top-2
    run = save_run(tmp_path / "run", GPT(cfg), data_dir)
    out = tmp_path / "export"
    assert main(["export", "--checkpoint", str(run), "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert "no Hugging Face MixtralForCausalLM equivalent" in err
    for needed in ("position=rope", "norm=rmsnorm", "ffn=swiglu", "bias=True"):
        assert needed in err
    assert not out.exists()
    switch = get_preset("debug", vocab_size=400, router="switch", top_k=1)
    run2 = save_run(tmp_path / "run2", GPT(switch), data_dir)
    assert main(["export", "--checkpoint", str(run2), "--out", str(out)]) == 1
    assert "router=topk" in capsys.readouterr().err


def test_existing_folders_are_never_overwritten_by_accident(data_dir, tmp_path, capsys):
    run = save_run(tmp_path / "run", GPT(get_preset("debug-dense", vocab_size=400)), data_dir)
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    assert main(["export", "--checkpoint", str(run), "--out", str(foreign), "--force"]) == 1
    assert "not a nanomoe export" in capsys.readouterr().err
    assert (foreign / "notes.txt").read_text() == "keep me" and len(list(foreign.iterdir())) == 1

    out = tmp_path / "export"
    assert main(["export", "--checkpoint", str(run), "--out", str(out), "--dtype", "bfloat16"]) == 0
    assert main(["export", "--checkpoint", str(run), "--out", str(out)]) == 1
    assert "--force" in capsys.readouterr().err
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    assert main(["export", "--checkpoint", str(run), "--out", str(out), "--force"]) == 0
    assert json.loads((out / "config.json").read_text())["dtype"] == "float32"
    assert json.loads((out / "nanomoe_export.json").read_text())["step"] == 12
    assert not [p for p in tmp_path.iterdir() if p.name.startswith((".tmp-", ".old-"))]
