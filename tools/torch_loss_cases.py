"""Write tests/peer_cases/torch_loss_cases.json: PyTorch's own test cases of
its loss functions, as data, for tests/test_peer_torch_losses.py.

Run with a Python that has torch (and expecttest, which torch's test helpers
import) installed; the test suite itself never imports torch:

    PYTHONPATH=<dir with expecttest> <python with torch> tools/torch_loss_cases.py

It calls PyTorch's own case generators, as its test suites do, on the CPU in
float32 (the criterion tests in their own default dtype):
  - module inputs: torch/testing/_internal/common_modules.py, every ModuleInfo
    of a ``*Loss`` module (module_inputs_func);
  - OpInfo samples: torch/testing/_internal/common_methods_invocations.py,
    every ``nn.functional`` OpInfo of a loss (sample_inputs);
  - criterion tests: torch/testing/_internal/common_nn.py, ``criterion_tests``;
  - bad inputs: the modules' module_error_inputs_func and the OpInfos'
    error_inputs (src "module_error" / "opinfo_error", with the error PyTorch
    raises).
Every case of every loss is written, ours or not; which ones we can run, and
why the others cannot, is decided by the test (our semantics live there).

A case keeps what defines it and drops the peer's random numbers: each float
tensor becomes its shape and the kind of values it holds (a softmax or
log-softmax along a dim, 0/1 values, or a uniform range with the drawn min and
max, NaN present or not), from which the test draws its own; integer tensors
(class indices, which decide which rows are ignored) are kept exactly. The
options are kept as given; a module's are read back from the constructed module
(PyTorch's criterion tests bind ``reduction`` late, so all of them construct
``reduction="sum"``: the table records what they run).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import sys

import torch
from torch.testing._internal import common_methods_invocations as cmi
from torch.testing._internal import common_modules as cm
from torch.testing._internal import common_nn as cnn

OUT = os.path.join(os.path.dirname(__file__), "..", "tests", "peer_cases", "torch_loss_cases.json")
SEED = 0
# The losses this package has a counterpart of (tests/test_peer_torch_losses.py
# decides which of their cases run). The cases of the other losses are listed
# by name only, to be counted.
COUNTERPARTS = {
    "torch.nn.CrossEntropyLoss", "nn.functional.cross_entropy",
    "torch.nn.LinearCrossEntropyLoss", "nn.functional.linear_cross_entropy",
    "nn.functional.linear_cross_entropy.chunked", "nn.functional.linear_cross_entropy.chunked_none",
    "torch.nn.SmoothL1Loss", "nn.functional.smooth_l1_loss",
    "torch.nn.L1Loss", "nn.functional.l1_loss",
    "torch.nn.HuberLoss", "nn.functional.huber_loss",
    "torch.nn.KLDivLoss", "nn.functional.kl_div",
    "torch.nn.BCEWithLogitsLoss", "nn.functional.binary_cross_entropy_with_logits",
}
MODULE_ATTRS = ("reduction", "ignore_index", "label_smoothing", "beta", "delta", "log_target",
                "weight", "pos_weight", "num_classes", "in_features", "out_features")


def _seed():
    """Seed every generator PyTorch's case generators draw from (some use
    Python's random), so that the table is the same on every run."""
    torch.manual_seed(SEED)
    random.seed(SEED)


def _round_out(v: float, down: bool) -> float:
    return (math.floor if down else math.ceil)(v * 1000.0) / 1000.0


def describe_tensor(t: torch.Tensor) -> str:
    """A tensor as one string, "T:<dtype>[<shape>] <kind> <numbers>": kinds
    "=" (the integer values, all of them: which rows are ignored, and which
    indices are out of range, is the case), "uniform lo hi" (the drawn min
    and max, rounded outwards), "value v" (one element), "softmax d" and
    "log_softmax d" (normalised along dim d), "binary" (0/1), "nan_inside"."""
    t = t.detach()
    head = f"T:{str(t.dtype).replace('torch.', '')}[{','.join(map(str, t.shape))}]"
    if not t.is_floating_point():
        return f"{head} = {' '.join(map(str, t.reshape(-1).tolist()))}".rstrip()
    t64 = t.double()
    if t.numel() == 0:
        return f"{head} empty"
    if torch.isnan(t64).any():
        return f"{head} nan_inside"
    if t.numel() == 1:
        return f"{head} value {t64.item()!r}"
    for dim in range(t.dim()):
        if t.shape[dim] < 2:
            continue
        one, zero = torch.ones(()).double(), torch.zeros(()).double()
        if (t64 >= 0).all() and torch.allclose(t64.sum(dim), one, atol=1e-5):
            return f"{head} softmax {dim}"
        if (t64 <= 0).all() and torch.allclose(t64.logsumexp(dim), zero, atol=1e-5):
            return f"{head} log_softmax {dim}"
    if ((t64 == 0) | (t64 == 1)).all():
        return f"{head} binary"
    lo, hi = t64.min().item(), t64.max().item()
    return f"{head} uniform {_round_out(lo, True)!r} {_round_out(hi, False)!r}"


def describe(v):
    """A JSON-able description of one argument."""
    if isinstance(v, torch.Tensor):
        return describe_tensor(v)
    if isinstance(v, torch.dtype):
        return {"torch_dtype": str(v).replace("torch.", "")}
    if isinstance(v, (list, tuple)):
        return [describe(x) for x in v]
    if isinstance(v, dict):
        return {k: describe(x) for k, x in v.items()}
    if isinstance(v, torch.nn.LinearCrossEntropyOptions):
        # memory/speed knobs of PyTorch's chunked linear CE, recorded as given
        # (the fields that differ from the defaults, as "name=value")
        default = torch.nn.LinearCrossEntropyOptions()
        return "chunking:" + "".join(f" {k}={getattr(v, k)}" for k in v.__dataclass_fields__
                                     if getattr(v, k) != getattr(default, k))
    if v is None or isinstance(v, (bool, int, float, str)):
        return v
    return {"repr": repr(v)}


def _case(src, peer, i, desc, **data):
    """One case: a name-only line for a loss without a counterpart here."""
    case = dict(src=src, peer=peer, i=i, desc=desc)
    if peer in COUNTERPARTS:
        case.update(data)
    return case


# assertEqual's default (rtol, atol) per dtype, which TestModule.test_forward
# applies unless a ModuleInfo overrides it
DEFAULT_TOLERANCE = {"float32": (1.3e-6, 1e-5), "float16": (1e-3, 1e-5),
                     "bfloat16": (1.6e-2, 1e-5), "float64": (1e-7, 1e-7)}


def forward_tolerances(mi):
    """{dtype: [rtol, atol]}: the tolerance TestModule.test_forward compares a
    module's output with its reference at, on the CPU, per dtype it tests."""
    tols = {}
    for d in mi.dtypes:
        name = str(d).replace("torch.", "")
        tols[name] = list(DEFAULT_TOLERANCE[name]) if name in DEFAULT_TOLERANCE else None
    for info in mi.decorators:
        if getattr(info, "test_name", None) != "test_forward" or info.device_type not in (None, "cpu"):
            continue
        for dec in info.decorators:
            for dt, t in getattr(dec, "d", {}).items():
                tols[str(dt).replace("torch.", "")] = [t.rtol, t.atol]
    return tols


def module_cases(dtypes, tolerances):
    for mi in cm.module_db:
        name = mi.module_cls.__name__
        if not name.endswith("Loss"):
            continue
        peer = f"torch.nn.{name}"
        dtypes[peer] = [str(d).replace("torch.", "") for d in mi.dtypes]
        tolerances[peer] = forward_tolerances(mi)
        _seed()
        inputs = mi.module_inputs_func(mi, device="cpu", dtype=torch.float32, requires_grad=False,
                                       training=True)
        for i, mod_in in enumerate(inputs):
            ctor, fwd = mod_in.constructor_input, mod_in.forward_input
            _seed()
            m = mi.module_cls(*ctor.args, **ctor.kwargs)
            # the options as the module holds them, and any other constructor
            # argument (bias=, options=) as given
            opts = {a: describe(getattr(m, a)) for a in MODULE_ATTRS if hasattr(m, a)}
            opts.update({k: describe(v) for k, v in ctor.kwargs.items()
                         if k not in opts and k not in ("device", "dtype")})
            yield _case("module", peer, i, mod_in.desc, opts=opts,
                        params={n: describe(p) for n, p in m.named_parameters()},
                        args=describe(list(fwd.args)))
            assert not fwd.kwargs, (peer, fwd.kwargs)


def _is_loss_op(op) -> bool:
    n = op.name
    return n.startswith("nn.functional.") and (
        "loss" in n or n.endswith(("cross_entropy", "kl_div", "binary_cross_entropy_with_logits")))


def opinfo_cases(dtypes):
    for op in cmi.op_db:
        if not _is_loss_op(op):
            continue
        _seed()
        samples = op.sample_inputs("cpu", torch.float32, requires_grad=False)
        peer = op.name + (f".{op.variant_test_name}" if op.variant_test_name else "")
        dtypes[peer] = sorted(str(d).replace("torch.", "") for d in op.dtypes)
        for i, s in enumerate(samples):
            yield _case("opinfo", peer, i, s.name or "", args=describe([s.input, *s.args]),
                        opts=describe(dict(s.kwargs)))


def criterion_cases(dtypes):
    for i, t in enumerate(cnn.criterion_tests):
        dt = t.get("default_dtype", torch.get_default_dtype())
        prev = torch.get_default_dtype()
        torch.set_default_dtype(dt)
        try:
            _seed()
            m = t["constructor"](*t.get("constructor_args", ()))
            args = []
            for name in ("input", "target"):
                if name + "_fn" in t:
                    args.append(t[name + "_fn"]())
                else:
                    args.append(torch.randn(t[name + "_size"]))
        finally:
            torch.set_default_dtype(prev)
        peer = f"torch.nn.{type(m).__name__}"
        dtypes["criterion " + peer] = [str(dt).replace("torch.", "")]
        yield _case("criterion", peer, i, t["fullname"], args=describe(args),
                    opts={a: describe(getattr(m, a)) for a in MODULE_ATTRS if hasattr(m, a)})


def error_cases():
    """PyTorch's bad-input cases of its losses (module_error_inputs_func,
    OpInfo error_inputs): the arguments and the error PyTorch raises."""
    for mi in cm.module_db:
        name = mi.module_cls.__name__
        if not name.endswith("Loss") or mi.module_error_inputs_func is None:
            continue
        _seed()
        for i, err in enumerate(mi.module_error_inputs_func(
                mi, device="cpu", dtype=torch.float32, requires_grad=False, training=True)):
            m_in = err.module_error_input
            ctor, fwd = m_in.constructor_input, m_in.forward_input
            yield _case("module_error", f"torch.nn.{name}", i, m_in.desc,
                        error=[err.error_type.__name__, err.error_on.name.lower()],
                        ctor_args=describe(list(ctor.args)),
                        opts={k: describe(v) for k, v in ctor.kwargs.items()
                              if k not in ("device", "dtype")},
                        args=describe(list(fwd.args) if fwd is not None else []))
    for op in cmi.op_db:
        if not _is_loss_op(op) or op.error_inputs_func is None:
            continue
        _seed()
        peer = op.name + (f".{op.variant_test_name}" if op.variant_test_name else "")
        for i, err in enumerate(op.error_inputs("cpu")):
            s = err.sample_input
            yield _case("opinfo_error", peer, i, s.name or "", error=[err.error_type.__name__],
                        args=describe([s.input, *s.args]), opts=describe(dict(s.kwargs)))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=OUT)
    args = ap.parse_args()
    dtypes, tolerances = {}, {}
    cases = [*module_cases(dtypes, tolerances), *opinfo_cases(dtypes), *criterion_cases(dtypes),
             *error_cases()]
    root = os.path.dirname(torch.__file__)
    files = [os.path.relpath(mod.__file__, os.path.dirname(root)) for mod in (cm, cmi, cnn)]
    header = dict(peer="PyTorch", version=torch.__version__, files=files,
                  generated_by="tools/torch_loss_cases.py", seed=SEED, dtype="float32",
                  count=len(cases), peer_dtypes=dtypes,
                  module_forward_tolerances=tolerances)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        # one case per line: diffs between PyTorch releases stay readable
        f.write('{"header": ' + json.dumps(header, sort_keys=True) + ',\n "cases": [\n')
        f.write(",\n".join(json.dumps(c, sort_keys=True, separators=(",", ":")) for c in cases))
        f.write("\n]}\n")
    print(f"{len(cases)} cases -> {os.path.relpath(args.out)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
