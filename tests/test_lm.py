"""mlx-lm adapters (mlx_fused_losses.lm): the loss and every trainable
parameter's gradient against mlx-lm's own default_loss, on tiny randomly
initialised models built from a config (no download), float32.

Skipped when mlx-lm is not installed (it is the optional extra ``[lm]``; CI
installs it)."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten, tree_map, tree_map_with_path, tree_unflatten

mlx_lm = pytest.importorskip(
    "mlx_lm", reason="mlx-lm is not installed (pip install 'mlx-fused-losses[lm]')"
)
from mlx_lm.tuner import trainer  # noqa: E402
from mlx_lm.tuner.utils import linear_to_lora_layers  # noqa: E402
from mlx_lm.utils import _get_classes  # noqa: E402

lm = pytest.importorskip("mlx_fused_losses.lm")

# How close the adapters' float32 loss and gradients must be. Two checks:
# * against mlx-lm's float32 default_loss, |ours - mlx-lm| <= MATCH * max|mlx-lm|
#   per array (the 1e-6) - for lm_loss, whose logits are mlx-lm's own;
# * against mlx-lm's default_loss in float64 (the exact value): ours may miss it
#   by MATCH * max|exact| more than mlx-lm's own float32 misses it, per array.
#   linear_lm_loss forms the logits and dH with another GEMM (other summation
#   order), and the body's gradients amplify fp32 rounding: mlx-lm's float32
#   gradients are themselves 5e-7..2e-6 (max-relative) from float64 on these
#   models, so "ours vs mlx-lm's float32 to 1e-6" is a coin flip at the noise
#   floor for any second float32 implementation, while this check is not.
MATCH = 1e-6

VOCAB, HIDDEN = 97, 64

_LLAMA = dict(
    model_type="llama",
    hidden_size=HIDDEN,
    num_hidden_layers=2,
    intermediate_size=128,
    num_attention_heads=4,
    num_key_value_heads=2,
    rms_norm_eps=1e-5,
    vocab_size=VOCAB,
)

# One tiny config per supported model type with a different head: plain,
# softcapped (gemma2), logits divided (granite) or multiplied (cohere).
CONFIGS = {
    "llama-tied": dict(_LLAMA, tie_word_embeddings=True),
    "llama-untied": dict(_LLAMA, tie_word_embeddings=False),
    "mistral": dict(_LLAMA, model_type="mistral", tie_word_embeddings=False),
    "qwen3": dict(_LLAMA, model_type="qwen3", head_dim=16, rope_theta=10000.0,
                  max_position_embeddings=64, tie_word_embeddings=True),
    "gemma2": dict(_LLAMA, model_type="gemma2", head_dim=16,
                   final_logit_softcapping=3.0, query_pre_attn_scalar=16.0),
    "granite": dict(_LLAMA, model_type="granite", logits_scaling=4.0,
                    attention_multiplier=0.25, embedding_multiplier=2.0,
                    residual_multiplier=0.5, max_position_embeddings=64,
                    attention_bias=False, mlp_bias=False, rope_theta=10000.0,
                    tie_word_embeddings=False),
    "cohere": dict(model_type="cohere", hidden_size=HIDDEN, num_hidden_layers=2,
                   intermediate_size=128, num_attention_heads=4,
                   num_key_value_heads=2, vocab_size=VOCAB, logit_scale=0.5),
}


def build(name, seed=0):
    config = dict(CONFIGS[name])
    model_type = {"mistral": "llama"}.get(config["model_type"], config["model_type"])
    model_class, args_class = _get_classes(dict(config, model_type=model_type))
    mx.random.seed(seed)
    model = model_class(args_class.from_dict(config))
    # Random init leaves logits of ~1e-2: scale the head (logit std 0.6-5) so
    # the softmax, a softcap of 3 and a logit scale matter. The body keeps its
    # init (scaled, it amplifies float32 rounding in its own gradients).
    model.update(tree_map_with_path(
        lambda path, p: p * 4.0 if "embed_tokens" in path or "lm_head" in path else p,
        model.parameters()))
    mx.eval(model.parameters())
    return model


def float64_twin(model):
    """The same model in float64, quantized layers replaced by dense frozen
    layers holding their dequantized weights (the function they compute)."""
    dense = []
    for name, layer in model.named_modules():
        if isinstance(layer, (nn.QuantizedLinear, nn.QuantizedEmbedding)):
            weight = mx.dequantize(layer["weight"], layer["scales"], layer.get("biases"),
                                   layer.group_size, layer.bits, mode=layer.mode,
                                   dtype=mx.float32)
            if isinstance(layer, nn.QuantizedLinear):
                replacement = nn.Linear(weight.shape[1], weight.shape[0], bias="bias" in layer)
                if "bias" in layer:
                    replacement.bias = layer["bias"]
            else:
                replacement = nn.Embedding(*weight.shape)
            replacement.weight = weight
            replacement.freeze()
            dense.append((name, replacement))
    if dense:
        model.update_modules(tree_unflatten(dense))
    model.set_dtype(mx.float64)
    return model


def make_batch(rng, rows=3, length=13):
    batch = mx.array(rng.integers(0, VOCAB, size=(rows, length)).astype(np.int32))
    # (offset, length) per row as iterate_batches yields them: a prompt of
    # `offset` tokens not trained on, padding after `length`.
    lengths = mx.array(np.array([[0, length - 1], [3, 9], [1, 5]][:rows], np.int32))
    return batch, lengths


def value_and_grads(model, loss_fn, batch, lengths):
    (loss, ntoks), grads = nn.value_and_grad(model, loss_fn)(model, batch, lengths)
    mx.eval(loss, ntoks, grads)
    return loss, ntoks, dict(tree_flatten(grads))


def _max_err(got, ref):
    return np.abs(np.array(got, np.float64) - np.array(ref, np.float64)).max()


def assert_matches_default_loss(make_model, loss_fn, batch, lengths, direct=True):
    """``make_model()`` builds the same model each call (seeded)."""
    mlx_loss, mlx_ntoks, mlx_grads = value_and_grads(
        make_model(), trainer.default_loss, batch, lengths)
    loss, ntoks, grads = value_and_grads(make_model(), loss_fn, batch, lengths)
    with mx.stream(mx.cpu):  # float64 is CPU-only in MLX
        exact_loss, _, exact_grads = value_and_grads(
            float64_twin(make_model()), trainer.default_loss, batch, lengths)
    assert loss.dtype == mx.float32 and ntoks.item() == mlx_ntoks.item()
    assert grads.keys() == mlx_grads.keys() == exact_grads.keys() and len(grads) > 0

    def check(name, got, mlx, exact):
        scale = np.abs(np.array(exact, np.float64)).max()
        assert scale > 0, f"{name}: zero gradient (the test would be vacuous)"
        err, mlx_err = _max_err(got, exact), _max_err(mlx, exact)
        assert err <= MATCH * scale + mlx_err, (
            f"{name}: max err vs float64 {err:.3g}, mlx-lm float32's {mlx_err:.3g}, |max| {scale:.3g}")
        if direct:
            err = _max_err(got, mlx)
            assert err <= MATCH * np.abs(np.array(mlx)).max(), (
                f"{name}: max err vs mlx-lm float32 {err:.3g}, |max| {scale:.3g}")

    check("loss", loss, mlx_loss, exact_loss)
    for name in exact_grads:
        check(name, grads[name], mlx_grads[name], exact_grads[name])


@pytest.fixture
def linear_ready(fl):
    if not hasattr(fl, "linear_cross_entropy"):
        pytest.skip("linear_cross_entropy is not built into this package yet")


@pytest.mark.parametrize("name", ["llama-tied", "llama-untied"])
def test_lm_loss_matches_default_loss(fl, rng, name):
    assert_matches_default_loss(lambda: build(name), lm.lm_loss, *make_batch(rng))


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_linear_lm_loss_matches_default_loss(linear_ready, rng, name):
    assert_matches_default_loss(lambda: build(name), lm.linear_lm_loss, *make_batch(rng),
                                direct=False)


def _qlora(name, keys=None, **quantization):
    """QLoRA as mlx-lm sets it up: quantize everything (head and embeddings
    included; group_size=32, bits=4 unless `quantization` says otherwise),
    freeze, put LoRA adapters on the layers."""
    model = build(name)
    nn.quantize(model, **(quantization or dict(group_size=32, bits=4)))
    model.freeze()
    config = dict(rank=4, scale=2.0, dropout=0.0)
    if keys is not None:
        config["keys"] = keys
    linear_to_lora_layers(model, 2, config)
    # LoRA's b starts at zero (no gradient for a): give it values so that both
    # factors are exercised.
    model.update(tree_map(
        lambda p: mx.random.normal(p.shape) * 0.1, model.trainable_parameters()))
    mx.eval(model.parameters())
    return model


@pytest.mark.parametrize("name", ["llama-tied", "llama-untied"])
def test_quantized_head_qlora(linear_ready, rng, name):
    head = lm.find_lm_head(_qlora(name))
    assert isinstance(head.layer, (nn.QuantizedLinear, nn.QuantizedEmbedding))
    batch = make_batch(rng)
    assert_matches_default_loss(lambda: _qlora(name), lm.linear_lm_loss, *batch, direct=False)
    assert_matches_default_loss(lambda: _qlora(name), lm.lm_loss, *batch)


# mlx-community's other widths (3 and 6 bits straddle the packed words) and
# MLX's floating-point modes (no biases; uint8 E8M0/E4M3 scales).
FORMATS = {"affine3": dict(bits=3), "affine6": dict(bits=6),
           "affine5-g32": dict(bits=5, group_size=32), "mxfp4": dict(mode="mxfp4"),
           "mxfp8": dict(mode="mxfp8"), "nvfp4": dict(mode="nvfp4")}


@pytest.mark.parametrize("fmt", list(FORMATS))
@pytest.mark.parametrize("name", ["llama-tied", "llama-untied"])
def test_quantized_head_every_format(linear_ready, rng, name, fmt):
    """nn.quantize(model, bits=3 / bits=6 / mode="mxfp4" ...): linear_lm_loss
    reads the head as quantized and matches mlx-lm's loss and gradients."""
    head = lm.find_lm_head(_qlora(name, **FORMATS[fmt]))
    expected = dict(dict(mode="affine"), **FORMATS[fmt])
    assert head.layer.mode == expected["mode"] and head.layer["weight"].dtype == mx.uint32
    if "bits" in expected:
        assert head.layer.bits == expected["bits"]
    batch = make_batch(rng)
    assert_matches_default_loss(lambda: _qlora(name, **FORMATS[fmt]), lm.linear_lm_loss, *batch,
                                direct=False)


@pytest.mark.parametrize("quantized", [False, True], ids=["dense", "qlora"])
def test_bfloat16_model(linear_ready, rng, quantized):
    """A bfloat16 model (as mlx-lm loads most checkpoints): both adapters run,
    return a float32 loss near mlx-lm's (which sums bf16-rounded token losses)
    and bf16 gradients."""
    def make():
        model = _qlora("llama-untied") if quantized else build("llama-untied")
        model.set_dtype(mx.bfloat16)
        return model

    batch = make_batch(rng)
    mlx_loss, _, _ = value_and_grads(make(), trainer.default_loss, *batch)
    for loss_fn in (lm.lm_loss, lm.linear_lm_loss):
        loss, _, grads = value_and_grads(make(), loss_fn, *batch)
        assert loss.dtype == mx.float32
        assert abs(loss.item() - mlx_loss.item()) <= 1e-2 * abs(mlx_loss.item())
        assert all(g.dtype == mx.bfloat16 and np.isfinite(np.array(g.astype(mx.float32))).all()
                   for g in grads.values())


def test_lora_on_unquantized_head(linear_ready, rng):
    def lora_head():
        model = build("llama-untied")
        model.freeze()
        linear_to_lora_layers(model, 2, dict(rank=4, scale=2.0, dropout=0.0,
                                             keys=["self_attn.q_proj", "lm_head"]))
        model.update(tree_map(
            lambda p: mx.random.normal(p.shape) * 0.1, model.trainable_parameters()))
        return model

    assert "lora_a" in lora_head().lm_head
    assert_matches_default_loss(lora_head, lm.linear_lm_loss, *make_batch(rng), direct=False)


def test_lora_on_quantized_head_is_refused(linear_ready, rng):
    model = _qlora("llama-untied", keys=["self_attn.q_proj", "lm_head"])
    with pytest.raises(ValueError, match="LoRA adapter on a quantized head"):
        lm.linear_lm_loss(model, *make_batch(rng))


def test_unsupported_model_is_refused(linear_ready, rng):
    class Tiny(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(4, VOCAB)

    with pytest.raises(ValueError, match="model_type"):
        lm.linear_lm_loss(Tiny(), *make_batch(rng))
    model = build("llama-untied")
    model.model_type = "minicpm"  # divides the hidden state before its head
    with pytest.raises(ValueError, match="minicpm"):
        lm.find_lm_head(model)


@pytest.mark.parametrize("batch,lengths,what", [
    (mx.zeros((3,), mx.int32), mx.zeros((3, 2), mx.int32), "batch"),
    (mx.zeros((3, 5), mx.int32), mx.zeros((3,), mx.int32), "lengths"),
])
def test_bad_batch(fl, batch, lengths, what):
    with pytest.raises(ValueError, match=what):
        lm.lm_loss(build("llama-tied"), batch, lengths)


@pytest.mark.parametrize("loss_name", ["lm_loss", "linear_lm_loss"])
def test_trainer_train_runs_with_our_loss(fl, tmp_path, rng, loss_name):
    """mlx_lm.tuner.trainer.train(..., loss=ours): compiled steps, the loss
    goes down on a repeated batch."""
    if loss_name == "linear_lm_loss" and not hasattr(fl, "linear_cross_entropy"):
        pytest.skip("linear_cross_entropy is not built into this package yet")
    import mlx.optimizers as optim

    model = build("llama-untied")
    data = [(list(rng.integers(0, VOCAB, size=20)), 0) for _ in range(4)]
    reports = []

    class Record(trainer.TrainingCallback):
        def on_train_loss_report(self, info):
            reports.append(info["train_loss"])

    args = trainer.TrainingArgs(batch_size=4, iters=6, steps_per_report=1,
                                steps_per_eval=1000, max_seq_length=32,
                                adapter_file=str(tmp_path / "adapters.safetensors"))
    trainer.train(model, optim.Adam(learning_rate=1e-2), data, args=args,
                  loss=getattr(lm, loss_name), training_callback=Record())
    assert len(reports) == 6 and all(np.isfinite(reports))
    assert reports[-1] < reports[0]


def test_finetune_example_quick(linear_ready, capsys):
    """examples/finetune_lm.py --quick at tiny vocabularies: every run trains,
    the three losses' curves agree (the script's own check, exit status 0)."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "examples" / "finetune_lm.py"
    spec = importlib.util.spec_from_file_location("finetune_lm", path)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    status = example.main(["--quick", "--vocab-sizes", "300", "700", "--steps", "3"])
    out = capsys.readouterr().out
    assert status == 0, out
    for name in ("mlx-lm", "fl CE", "fl linear"):
        assert out.count(f"   {name} ") == 3, out


def test_counted_out_of_range_target_is_nan_in_both_losses(linear_ready, rng):
    """One rule for lm_loss and linear_lm_loss (issue 18, item 10): a counted
    target outside the vocabulary is a NaN loss, whatever its value; only the
    tokens mlx-lm's lengths leave out are ignored. lm_loss turned masked
    tokens into -100 and ignored every -100, so a counted -100 target was
    silently left out (while linear_lm_loss gave NaN)."""
    batch, lengths = make_batch(rng)
    model = build("llama-tied")
    for bad in (-100, VOCAB):
        # the last position is only a target (never an input), counted in row 0
        b = mx.concatenate([batch[:, :-1], mx.array([[bad], [0], [0]], mx.int32)], axis=1)
        for loss_fn in (lm.lm_loss, lm.linear_lm_loss):
            loss, ntoks = loss_fn(model, b, lengths)
            assert np.isnan(loss.item()), (loss_fn.__name__, bad)
    # and the masked tokens still do not count
    loss, _ = lm.lm_loss(model, batch, lengths)
    assert np.isfinite(loss.item())
