"""The pre-flight check: a device map checked against a model before anything loads.

:func:`preflight` takes a model (on the meta device or real), a device map and
optionally a budget and a checkpoint, and returns a :class:`Report` of
:class:`Finding` s, each with what is wrong and what to change. It never
builds a torch device from a GPU id in planning mode, so a CPU-only machine
can check plans for GPUs it does not have. Notebook 03 introduces it; the
troubleshooting notebook (06) shows every kind of finding on a real case.

Sizes are bytes of parameters and persistent buffers only (no activations, no
KV cache, no CUDA context), counted as in :mod:`helpers.devicemap`.
"""

from __future__ import annotations

import difflib
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from accelerate.utils import convert_file_size_to_int, find_tied_parameters

from .devicemap import bytes_per_device, canonical_device, device_label, device_order, owner_key, tensor_sizes
from .units import format_size

@dataclass
class Finding:
    """One problem found by :func:`preflight`.

    kind: short code: "unplaced", "unknown-module", "unknown-device",
          "absent-device", "tie-lost", "tied-split", "tied-missing", "missing",
          "no-split-cut", "no-split-unknown", "over-budget", "no-budget",
          "quantized-offload".
    message: what is wrong, naming the parameters/modules/devices.
    fix: what to change.
    """

    kind: str
    message: str
    fix: str


@dataclass
class Report:
    """The result of :func:`preflight`: ``ok`` is True when there are no findings.

    ``bytes_per_device`` maps each device of the map (GPU ids as int, "cpu",
    "disk") to the bytes assigned to it; ``budget`` holds the parsed budget in
    bytes (empty without one).
    """

    findings: list[Finding] = field(default_factory=list)
    bytes_per_device: dict = field(default_factory=dict)
    budget: dict = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.findings

    def kinds(self) -> list[str]:
        """The findings' kinds, in order (handy in asserts)."""
        return [f.kind for f in self.findings]

    def raise_if_problems(self) -> None:
        """Raise ValueError listing every finding and its fix (no-op when ok)."""
        if self.findings:
            raise ValueError(str(self))

    def __str__(self) -> str:
        used = ", ".join(f"{device_label(d)} {format_size(b)}" for d, b in self.bytes_per_device.items())
        if self.ok:
            return "pre-flight check: OK" + (f" ({used})" if used else "")
        lines = [f"pre-flight check: {len(self.findings)} problem(s)"]
        for i, f in enumerate(self.findings, 1):
            lines += [f"{i}. [{f.kind}] {f.message}", f"   fix: {f.fix}"]
        return "\n".join(lines)



# --------------------------------------------------------------------------
# inputs


def parse_budget(max_memory: dict | None) -> dict:
    """Turn a ``max_memory``-style dict into {device: bytes}.

    Keys: GPU ids (int or "cuda:N"), "cpu", "disk". Values: bytes (int or
    float) or size strings read by accelerate's ``convert_file_size_to_int``:
    "35GiB" is 35 * 2**30 bytes, "500MB" is 500 * 10**6.

    Raises:
        ValueError: a key that is not a device, or a value that is not a size.
    """
    out = {}
    for key, value in (max_memory or {}).items():
        dev = canonical_device(key)
        if dev is None:
            raise ValueError(f"max_memory key {key!r} is not a device: use GPU ids (0, 1, ...), 'cpu' or 'disk'.")
        try:
            out[dev] = int(value) if isinstance(value, (int, float)) else convert_file_size_to_int(value)
        except (ValueError, AttributeError, TypeError):
            raise ValueError(
                f"max_memory[{key!r}] = {value!r} is not a size: give bytes (an int) or a string such as "
                f"'35GiB' (2**30 bytes each) or '500MB' (10**6 bytes each)."
            ) from None
    return out


def declared_ties(model) -> list[tuple[str, str]]:
    """Tied parameter pairs (target, source) as the model declares them.

    From transformers' ``all_tied_weights_keys`` (set by ``from_pretrained``
    and ``post_init``) or ``get_expanded_tied_weights_keys`` (read from the
    config's ``tie_word_embeddings`` and the class's ``_tied_weights_keys``),
    plus parameters that already share storage (accelerate's
    ``find_tied_parameters``). On the meta device after
    ``init_empty_weights`` sharing is lost, so the declaration is what counts.
    """
    declared = getattr(model, "all_tied_weights_keys", None)
    if declared is None and hasattr(model, "get_expanded_tied_weights_keys"):
        declared = model.get_expanded_tied_weights_keys(all_submodels=True)
    pairs = list((declared or {}).items())
    seen = {frozenset(p) for p in pairs}
    for group in find_tied_parameters(model):
        for other in group[1:]:
            if frozenset((other, group[0])) not in seen:
                pairs.append((other, group[0]))
                seen.add(frozenset((other, group[0])))
    return pairs


def checkpoint_keys(checkpoint) -> set[str]:
    """The tensor names stored in a checkpoint directory (or one .safetensors file).

    Reads ``*.safetensors.index.json`` / ``*.bin.index.json`` or the header of
    ``model.safetensors``; no tensor is loaded.

    Raises:
        FileNotFoundError: no index or safetensors file there.
    """
    p = Path(checkpoint).expanduser()
    if p.is_file() and p.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(p), framework="pt") as f:
            return set(f.keys())
    for index in sorted(p.glob("*.index.json")) if p.is_dir() else []:
        return set(json.loads(index.read_text())["weight_map"])
    if (p / "model.safetensors").is_file():
        return checkpoint_keys(p / "model.safetensors")
    raise FileNotFoundError(
        f"{p} holds no checkpoint index (*.index.json) or model.safetensors: pass the directory "
        f"written by save_pretrained, or checkpoint=None to skip the checkpoint checks."
    )


def _quant_config(model, hf_quantizer):
    if hf_quantizer is not None:
        return hf_quantizer.quantization_config
    q = getattr(model, "hf_quantizer", None)
    if q is not None:
        return q.quantization_config
    if getattr(model, "is_quantized", False):
        return getattr(getattr(model, "config", None), "quantization_config", None)
    return None


# --------------------------------------------------------------------------
# the check


def preflight(model, device_map: dict, max_memory: dict | None = None, *, mode: str = "plan",
              checkpoint=None, no_split_module_classes=None, dtype=None, hf_quantizer=None) -> Report:
    """Check a device map against a model (meta or real) before anything loads.

    Args:
        model: a ``torch.nn.Module`` (usually a transformers model on the meta device).
        device_map: {module-name prefix: device}; devices are GPU ids (int or
            "cuda:N"), "cpu" or "disk". "" covers the whole model.
        max_memory: optional budget per device, as for ``max_memory`` in
            accelerate: bytes or size strings ("35GiB", "500MB").
        mode: "plan" (devices may be hypothetical: GPU 3 on a laptop is fine)
            or "run" (every device must exist on this machine).
        checkpoint: optional checkpoint directory; parameters whose keys it
            lacks (e.g. a tied ``lm_head.weight``) are checked against the map.
        no_split_module_classes: class names that must stay whole on one
            device; the model's own ``_no_split_modules`` are always added.
        dtype: count floating-point tensors in this dtype (e.g.
            ``torch.bfloat16``) instead of their current one.
        hf_quantizer: a transformers quantizer the meta model was prepared
            with; sizes then follow transformers' accounting (0.5 byte per
            4-bit weight, 1 per 8-bit weight, without the block scales).

    Returns:
        A :class:`Report`; ``str(report)`` lists each finding with its fix.

    Finds: tensors with no device; map keys that match no module; devices
    that are not devices (e.g. "meta") or, in run mode, absent here; tied
    parameters whose tie was lost on the meta device, placed on different
    devices, or absent from the checkpoint while mapped to "disk"; other
    parameters absent from the checkpoint; a no-split module cut across
    devices or a no-split class name that matches no module; a device over
    its budget or without one; bitsandbytes-quantized modules offloaded.

    Raises:
        ValueError: ``mode`` is not "plan"/"run", ``device_map`` is not a dict
            (plan a string such as "auto" first with ``infer_auto_device_map``),
            or ``max_memory`` is malformed.
        FileNotFoundError: ``checkpoint`` holds no index or safetensors file.
    """
    if mode not in ("plan", "run"):
        raise ValueError(f"mode must be 'plan' or 'run', not {mode!r}.")
    if not isinstance(device_map, dict):
        raise ValueError(
            f"preflight checks a concrete map (a dict), not {device_map!r}: plan one first, e.g. "
            f"accelerate.infer_auto_device_map(model, max_memory=..., no_split_module_classes=model._no_split_modules)."
        )
    report = Report(budget=parse_budget(max_memory))
    where = {key: canonical_device(value) for key, value in device_map.items()}  # map key -> canonical device (None: bad)
    names = [n for n, _ in model.named_parameters(remove_duplicate=False)] + \
            [n for n, _ in model.named_buffers(remove_duplicate=False)]
    owner = {n: owner_key(n, device_map) for n in names}
    device_of = {n: (where[k] if k is not None else None) for n, k in owner.items()}
    report.bytes_per_device = bytes_per_device(model, device_map, tensor_sizes(model, dtype, hf_quantizer))
    ckpt = checkpoint_keys(checkpoint) if checkpoint is not None else None

    report.findings += _check_devices(model, device_map, where, owner, mode)
    report.findings += _check_ties(model, device_map, device_of, ckpt)
    report.findings += _check_no_split(model, device_of, no_split_module_classes)
    report.findings += _check_budget(report.bytes_per_device, report.budget)
    report.findings += _check_quantized(model, where, hf_quantizer)
    return report


def _check_devices(model, device_map, where, owner, mode) -> list[Finding]:
    """Bad device values, devices absent here (run mode), keys matching no module, tensors with no device."""
    out = []
    for key, value in device_map.items():
        if where[key] is None:
            why = "the meta device holds no data" if str(value).startswith("meta") else "not a device accelerate loads to"
            out.append(Finding("unknown-device", f"device_map[{key!r}] = {value!r}: {why}.",
                               f"map {key!r} to a GPU id (0, 1, ...), 'cpu' or 'disk'."))
    if mode == "run":
        n_gpu = torch.cuda.device_count()
        here = ", ".join(["cpu", "disk"] + [str(i) for i in range(n_gpu)])
        for dev in sorted({d for d in where.values() if isinstance(d, int) and d >= n_gpu}):
            keys = [k for k, d in where.items() if d == dev]
            out.append(Finding(
                "absent-device",
                f"the map puts {len(keys)} module(s) (e.g. {keys[0]!r}) on GPU {dev}, but this machine has "
                f"{n_gpu} CUDA GPU(s) (torch.cuda.device_count() = {n_gpu}).",
                f"move them to a device that exists here ({here}), re-plan with a max_memory that names only this "
                f"machine's devices, or use mode='plan' for a machine you don't have."))
    modules = dict(model.named_modules())
    unknown = [k for k in device_map if k != "" and k not in modules]
    if unknown:
        out.append(Finding(
            "unknown-module", f"{len(unknown)} map key(s) match no module of the model: {', '.join(map(repr, unknown[:5]))}.",
            "use names from model.named_modules() (print(model) shows them); check for a missing 'model.' prefix."))
    unplaced = [n for n, k in owner.items() if k is None]
    if unplaced:
        roots = sorted({n.rsplit(".", 1)[0] for n in unplaced})
        out.append(Finding(
            "unplaced", f"{len(unplaced)} tensor(s) have no device, in module(s): {', '.join(roots[:6])}"
            + (" ..." if len(roots) > 6 else "") + ".",
            f"add entries for them, e.g. device_map[{roots[0]!r}] = 'cpu', or a catch-all key \"\"."))
    return out


def _check_ties(model, device_map, device_of, ckpt) -> list[Finding]:
    """Every declared tied pair: tie lost on meta, ends on different devices, keys absent from the checkpoint."""
    out = []
    params = dict(model.named_parameters(remove_duplicate=False))
    pairs = [(t, s) for t, s in declared_ties(model) if t in params and s in params]
    for target, source in pairs:
        td, sd = device_of.get(target), device_of.get(source)
        if params[target] is not params[source] and params[target].is_meta and params[source].is_meta:
            extra = ""
            if ckpt is not None and (target not in ckpt or source not in ckpt):
                absent = target if target not in ckpt else source
                extra = (f" The checkpoint has no {absent!r}, so it would stay on the meta device "
                         f"('Cannot copy out of meta tensor; no data!').")
            out.append(Finding(
                "tie-lost", f"{target} and {source} are declared tied but are separate parameters (the tie is lost, "
                f"e.g. by init_empty_weights): sizes count the pair twice and a map may split it.{extra}",
                "call model.tie_weights() after building the empty model (or build it under torch.device('meta')), "
                "then plan the map again."))
        if td is not None and sd is not None and td != sd:
            out.append(Finding(
                "tied-split", f"tied parameters {target} ({device_label(td)}) and {source} ({device_label(sd)}) are on different devices.",
                f"map the modules of both to one device that holds weights in memory, e.g. "
                f"{owner_key(target, device_map)!r} and {owner_key(source, device_map)!r} both to "
                f"{sd if sd != 'disk' else 'cpu'!r}; offload decoder layers instead."))
        if ckpt is None:
            continue
        for name, dev, other in ((target, td, source), (source, sd, target)):
            if name not in ckpt and other in ckpt and dev == "disk":
                out.append(Finding(
                    "tied-missing", f"{name} is not in the checkpoint (it is filled from {other} by the tie) and the map "
                    f"puts it on disk: the offload index gets no entry for it and the forward pass fails with "
                    f"KeyError: {name!r}.",
                    f"keep {owner_key(name, device_map)!r} and {owner_key(other, device_map)!r} in memory (a GPU or 'cpu'); "
                    f"offload decoder layers instead."))
        if target not in ckpt and source not in ckpt:
            out.append(Finding("tied-missing", f"neither {target} nor {source} is in the checkpoint.",
                               "check that the checkpoint matches the model (its config and class)."))
    if ckpt is not None:
        tied = {n for pair in pairs for n in pair}
        missing = [n for n, _ in model.named_parameters() if n not in ckpt and n not in tied]
        if missing:
            out.append(Finding(
                "missing", f"{len(missing)} parameter(s) are not in the checkpoint, e.g. {missing[0]}: they would "
                f"stay on the meta device (or keep random values).",
                "check that the checkpoint matches the model class and config, or initialise those weights yourself."))
    return out


def _check_no_split(model, device_of, no_split_module_classes) -> list[Finding]:
    """No-split class names that match nothing; no-split modules (the model's own always included) cut across devices."""
    out = []
    modules = dict(model.named_modules())
    declared = sorted(getattr(model, "_no_split_modules", None) or [])
    given = list(no_split_module_classes or [])
    classes = {type(m).__name__ for m in modules.values()}
    for name in given:
        if name not in classes:
            close = difflib.get_close_matches(name, sorted(classes), n=1)
            out.append(Finding(
                "no-split-unknown", f"no module of the model has the class {name!r} named in no_split_module_classes; "
                f"it protects nothing." + (f" Did you mean {close[0]!r}?" if close else ""),
                f"use the model's own list: no_split_module_classes=model._no_split_modules ({declared})."))
    keep_whole = (set(declared) | set(given)) & classes
    cut = []
    for mname, module in modules.items():
        if type(module).__name__ not in keep_whole or any(mname.startswith(c + ".") for c in cut):
            continue
        inside = {d for n, d in device_of.items() if d is not None and (not mname or n.startswith(mname + "."))}
        if len(inside) > 1:
            cut.append(mname)
            devs = ", ".join(device_label(d) for d in sorted(inside, key=device_order))
            out.append(Finding(
                "no-split-cut", f"{mname} ({type(module).__name__}) must stay whole but is cut across {devs}: its "
                f"residual connection would mix tensors from different devices ('Expected all tensors to be on the "
                f"same device').",
                f"map the whole module to one device (one entry {mname!r}, no sub-entries), or plan with "
                f"no_split_module_classes=model._no_split_modules ({declared})."))
    return out


def _check_budget(used: dict, budget: dict) -> list[Finding]:
    """Bytes of weights per device against max_memory (disk without a budget is unlimited)."""
    out = []
    for dev, n in used.items() if budget else ():
        if dev not in budget and dev != "disk":
            out.append(Finding("no-budget", f"the map uses {device_label(dev)} ({format_size(n)}) but max_memory gives it no budget.",
                               f"add {dev!r} to max_memory or move its modules to a budgeted device."))
        elif dev in budget and n > budget[dev]:
            over = format_size(n - budget[dev])
            out.append(Finding(
                "over-budget", f"{device_label(dev)} gets {format_size(n)} of weights but its budget is {format_size(budget[dev])} "
                f"(over by {over}).",
                f"move about {over} of modules (e.g. whole decoder layers) from {device_label(dev)} to another device, "
                f"or raise max_memory[{dev!r}]."))
    return out


def _check_quantized(model, where, hf_quantizer) -> list[Finding]:
    """bitsandbytes: transformers refuses CPU/disk offload unless llm_int8_enable_fp32_cpu_offload, which needs a GPU."""
    qc = _quant_config(model, hf_quantizer)
    get = (lambda k: qc.get(k)) if isinstance(qc, dict) else (lambda k: getattr(qc, k, None))  # noqa: E731
    method = get("quant_method") if qc is not None else None
    if not str(getattr(method, "value", method)).startswith("bitsandbytes"):
        return []
    values = {d for d in where.values() if d is not None}
    offloaded = {"cpu", "disk"} & values
    if not get("llm_int8_enable_fp32_cpu_offload") and values != {"cpu"} and offloaded:
        return [Finding(
            "quantized-offload", f"the model is quantized with bitsandbytes and the map sends modules to "
            f"{' and '.join(sorted(offloaded))}: from_pretrained refuses ('Some modules are dispatched on the CPU or "
            f"the disk...').",
            "give it room: a budget that holds the whole quantized model on the GPU(s), or on a machine without a "
            "GPU everything on the CPU (device_map={'': 'cpu'} with enough max_memory['cpu']).")]
    if get("llm_int8_enable_fp32_cpu_offload") and not any(isinstance(d, int) for d in values) and "disk" in values:
        return [Finding(
            "quantized-offload", "llm_int8_enable_fp32_cpu_offload is set but the map has no GPU and puts modules on "
            "disk: loading succeeds, generate fails ('Cannot access accelerator device when none is available').",
            "on a machine without a GPU keep the quantized model whole on the CPU (device_map={'': 'cpu'}) with "
            "enough max_memory['cpu'], and drop llm_int8_enable_fp32_cpu_offload.")]
    return []


