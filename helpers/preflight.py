"""The pre-flight check: a device map checked against a model before anything loads.

:func:`preflight` takes a model (on the meta device or real), a device map and
optionally a budget and a checkpoint, and returns a :class:`Report` of
:class:`Finding` s, each with what is wrong and what to change. It never
builds a torch device from a GPU id in planning mode, so a CPU-only machine
can check plans for GPUs it does not have. Notebook 03 introduces it; the
troubleshooting notebook (06) shows every kind of finding on a real case.

The budget (``max_memory``) is read by :func:`helpers.budgets.parse_budget`,
which refuses (ValueError, naming the fix) what accelerate refuses or crashes
on and what cannot be meant, and warns (:class:`helpers.budgets.BudgetWarning`)
about what it silently takes but is probably a mistake; both names are
importable from here too. :func:`preflight` never changes the dicts passed in.

Sizes are bytes of parameters and persistent buffers only (no activations, no
KV cache, no CUDA context), counted as in :mod:`helpers.devicemap`; the two
transient peaks are opt-in (notebook 05): with ``loader="from_pretrained"``
(or ``prompt=``), a bitsandbytes quantizer and a budget, the load peak of
quantizing while loading ("load-peak"); with ``prompt=``, the prefill
activations beside the weights and the KV cache ("prefill-peak").
"""

from __future__ import annotations

import difflib
import json
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from accelerate.utils import find_tied_parameters

# BudgetWarning and parse_budget are defined in helpers.budgets; notebooks 06 and 08 import them from here too
from .budgets import BudgetWarning, budget_key, parse_budget  # noqa: F401
from .devicemap import bytes_per_device, canonical_device, device_label, device_order, owner_key, tensor_sizes
from .text import wrap
from .units import format_size

if TYPE_CHECKING:
    from transformers.quantizers import HfQuantizer


@dataclass
class Finding:
    """One problem found by :func:`preflight`.

    kind: short code: "unplaced", "unknown-module", "unknown-device",
          "absent-device", "all-meta", "tie-lost", "tied-split",
          "tied-missing", "missing", "no-split-cut", "no-split-unknown",
          "over-budget", "no-budget", "quantized-offload", "no-offload-folder",
          "load-peak", "prefill-peak" (notebook 05).
    message: what is wrong, naming the parameters/modules/devices.
    fix: what to change.

    Notebooks 03 and 08.
    """

    kind: str
    message: str
    fix: str


@dataclass
class Report:
    """The result of :func:`preflight`: ``ok`` is True when there are no findings.

    ``bytes_per_device`` maps each device of the map (GPU ids as int, "cpu",
    "disk", other accelerators as :func:`helpers.devicemap.canonical_device` writes them: "mps",
    "xpu:0") to the bytes assigned to it; ``budget`` holds the parsed budget in
    bytes (empty without one), keyed as accelerate keys ``max_memory``.

    Notebooks 03 and 08.
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
            return wrap("pre-flight check: OK" + (f" ({used})" if used else ""))
        lines = [f"pre-flight check: {len(self.findings)} problem(s)"]
        for i, f in enumerate(self.findings, 1):
            lines += [f"{i}. [{f.kind}] {f.message}", f"   fix: {f.fix}"]
        return wrap("\n".join(lines))  # lines fit a JupyterLab output line (helpers.text)



LOADERS = (None, "load_checkpoint_and_dispatch", "dispatch_model", "from_pretrained")
"""What :func:`preflight`'s ``loader=`` may name (None: the map is only planned, no loader-specific check)."""


def _declared_ties(model) -> list[tuple[str, str]]:
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


def _checkpoint_keys(checkpoint) -> set[str]:
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
        return _checkpoint_keys(p / "model.safetensors")
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


def preflight(model: torch.nn.Module, device_map: dict, max_memory: dict | None = None, *, mode: str = "plan",
              checkpoint: str | os.PathLike | None = None, no_split_module_classes: Iterable[str] | None = None,
              dtype: torch.dtype | None = None, hf_quantizer: HfQuantizer | None = None,
              strategy: str | None = None, loader: str | None = None,
              offload_folder: str | os.PathLike | None = None, prompt: int | None = None, batch: int = 1,
              context: int | None = None) -> Report:
    """Check a device map against a model (meta or real) before anything loads.

    Args:
        model: a ``torch.nn.Module`` (usually a transformers model on the meta device).
        device_map: {module-name prefix: device}; devices are GPU ids (int,
            "cuda:N" or ``torch.device``), "cpu", "disk", or the other
            accelerators accelerate moves weights to ("mps", "xpu:0", "npu:1",
            ...; see :func:`helpers.devicemap.canonical_device`). "" covers the whole model.
        max_memory: optional budget per device, as for ``max_memory`` in
            accelerate: {GPU id / "mps" / "cpu" / "disk": bytes or a size
            string ("35GiB", "500MB")}; read by :func:`parse_budget`, which
            raises or warns (:class:`BudgetWarning`) on a bad one. The dict is
            never changed.
        mode: "plan" (devices may be hypothetical: GPU 3 on a laptop is fine)
            or "run" (every device must exist on this machine, and the model
            must hold weights, see "all-meta" below).
        checkpoint: optional checkpoint directory; parameters whose keys it
            lacks (e.g. a tied ``lm_head.weight``) are checked against the map.
        no_split_module_classes: class names that must stay whole on one
            device; the model's own ``_no_split_modules`` are always added.
        dtype: count floating-point tensors in this dtype (e.g.
            ``torch.bfloat16``) instead of their current one.
        hf_quantizer: a transformers quantizer the meta model was prepared
            with; sizes then follow transformers' accounting (0.5 byte per
            4-bit weight, 1 per 8-bit weight, without the block scales).
        strategy: the ``device_map`` string the map was (or will be) planned
            with from ``max_memory`` ("auto", "balanced", "balanced_low_0",
            "sequential"); None (default) for a map by hand. Passed to
            :func:`parse_budget`: "balanced_low_0" refuses GPU ids with gaps
            and warns louder about a GPU with 0 bytes.
        loader: opt-in: the function that will load with this map, one of
            "load_checkpoint_and_dispatch", "dispatch_model" (accelerate) or
            "from_pretrained" (transformers). None (default): the map is only
            planned and no loader-specific check runs. With
            "load_checkpoint_and_dispatch" or "dispatch_model" a map that
            uses "disk" needs ``offload_folder``; with
            "load_checkpoint_and_dispatch" the model is expected to be an
            empty skeleton, so "all-meta" is not reported.
        offload_folder: the folder that loader gets as ``offload_folder``
            (``offload_dir`` for ``dispatch_model``); only read with ``loader``.
            transformers 5.24's ``from_pretrained`` reads safetensors
            weights on "disk" in place and needs none.
        prompt: opt-in (notebook 05): tokens prefilled at once. With it and a
            budget, each device that runs decoder layers (a GPU also runs
            those offloaded to "cpu"/"disk") must hold its weights (with
            quantization scales), the KV cache of ``context`` tokens and the
            prefill activation peak
            (:func:`helpers.memory.prefill_peak_bytes` of ``prompt`` x
            ``batch``), else a "prefill-peak" finding.
        batch: sequences prefilled together (with ``prompt``), >= 1.
        context: tokens of KV cache to count with ``prompt`` (None: ``prompt``).

    With ``loader="from_pretrained"`` (or ``prompt``), a bitsandbytes
    quantizer that quantizes while loading and a budget, every device must
    also hold the load peak, its weights with scales plus the temporaries of
    its largest quantized weight (:func:`helpers.memory.load_peak_bytes`),
    else a "load-peak" finding.

    Returns:
        A :class:`Report`; ``str(report)`` lists each finding with its fix.

    Finds: tensors with no device (the fix names the map-level key, e.g.
    ``model.layers.3``, and the device of its neighbouring entry); map keys
    that match no module; devices that are not devices (e.g. "meta") or, in
    run mode, absent here; in run mode, a model that came out of
    ``from_pretrained`` with every parameter on the meta device ("all-meta":
    loaded inside ``init_empty_weights``, its weights were never read; a
    skeleton built with ``from_config`` is meta by construction and is not
    flagged); tied parameters whose tie was lost on the meta device, placed
    on different devices, or absent from the checkpoint while mapped to
    "disk"; other parameters absent from the checkpoint; a no-split module
    cut across devices or a no-split class name that matches no module; a
    device over its budget or without one; bitsandbytes-quantized modules
    offloaded; with ``loader``, "disk" without an offload folder.

    Raises:
        ValueError: ``mode`` is not "plan"/"run", ``device_map`` is not a dict
            (plan a string such as "auto" first with ``infer_auto_device_map``),
            ``strategy`` or ``loader`` is unknown, or ``max_memory`` is bad
            (see :func:`parse_budget`: a string, "cuda:0" keys, gaps in GPU ids
            with "balanced_low_0", negative/boolean/infinite/NaN sizes).
        FileNotFoundError: ``checkpoint`` holds no index or safetensors file.

    Warns:
        :class:`BudgetWarning`: sizes in bits ("10Gb") or a GPU with a budget
        of 0 (see :func:`parse_budget`).

    Notebook 03 designs maps and introduces this check; notebook 08 shows
    every kind of finding on a real case.
    """
    if mode not in ("plan", "run"):
        raise ValueError(f"mode must be 'plan' or 'run', not {mode!r}.")
    if loader not in LOADERS:
        raise ValueError(f"loader must be one of {LOADERS}, not {loader!r}.")
    if not isinstance(device_map, dict):
        raise ValueError(
            f"preflight checks a concrete map (a dict), not {device_map!r}: plan one first, e.g. "
            f"accelerate.infer_auto_device_map(model, max_memory=..., no_split_module_classes=model._no_split_modules)."
        )
    report = Report(budget=parse_budget(max_memory, strategy, stacklevel=2))
    # map key -> canonical device (None: not a device)
    where = {key: canonical_device(value) for key, value in device_map.items()}
    names = _tensor_order(model)
    owner = {n: owner_key(n, device_map) for n in names}
    device_of = {n: (where[k] if k is not None else None) for n, k in owner.items()}
    report.bytes_per_device = bytes_per_device(model, device_map, tensor_sizes(model, dtype, hf_quantizer))
    ckpt = _checkpoint_keys(checkpoint) if checkpoint is not None else None
    loaded_empty = _loaded_but_empty(model)

    report.findings += _check_devices(model, device_map, where, owner, device_of, no_split_module_classes, mode)
    if mode == "run" and loaded_empty and loader != "load_checkpoint_and_dispatch":
        report.findings.append(_all_meta_finding(model))
    report.findings += _check_ties(model, device_map, device_of, ckpt, loaded_empty)
    report.findings += _check_no_split(model, device_of, no_split_module_classes)
    report.findings += _check_budget(report.bytes_per_device, report.budget)
    report.findings += _check_quantized(model, where, hf_quantizer)
    report.findings += _check_offload_folder(where, loader, offload_folder)
    if loader == "from_pretrained" or prompt is not None:
        report.findings += _check_peaks(model, device_of, report.budget, hf_quantizer, prompt, batch, context)
    return report


def _tensor_order(model) -> list[str]:
    """Every parameter and buffer name (tied ones under each name), in module order.

    A module's own tensors come before its children's (embedding, layers 0..N-1, norm, head).
    """
    out = []
    for mname, module in model.named_modules(remove_duplicate=False):
        own = list(module.named_parameters(prefix=mname, recurse=False, remove_duplicate=False))
        own += list(module.named_buffers(prefix=mname, recurse=False, remove_duplicate=False))
        out += [name for name, _ in own]
    return list(dict.fromkeys(out))


def _accelerator_here(dev) -> tuple[bool, str]:
    """Is a non-CUDA accelerator device ("mps", "xpu:1", ...) present on this machine? And how that was asked."""
    if dev == "mps":
        return torch.backends.mps.is_available(), "torch.backends.mps.is_available()"
    kind, index = dev.split(":")
    mod = getattr(torch, kind, None)
    if mod is None or not hasattr(mod, "is_available"):
        return False, f"torch has no {kind!r} backend (torch.{kind} is missing)"
    try:
        n = mod.device_count() if mod.is_available() else 0
    except Exception:  # noqa: BLE001 - a backend that cannot even count is absent
        n = 0
    return int(index) < n, f"torch.{kind}.device_count() = {n}"


def _unplaced_groups(model, names, owner, device_of, no_split_module_classes):
    """Unplaced tensors grouped at the map's granularity: [(key to add, device to give it, neighbour key)].

    The key is the shortest module prefix whose tensors are all unplaced (or
    the tensor itself), widened to the outermost no-split module around it;
    the device is that of the no-split module's placed part, else of the
    nearest placed tensor before it in model order (after it, at the start).
    """
    unplaced = {n for n in names if owner[n] is None}
    modules = dict(model.named_modules())
    keep_whole = set(getattr(model, "_no_split_modules", None) or []) | set(no_split_module_classes or [])
    placed = [i for i, n in enumerate(names) if device_of.get(n) is not None]

    def under(prefix):
        return [n for n in names if n.startswith(prefix + ".")]

    groups = {}
    for name in names:
        if name not in unplaced or any(name.startswith(k + ".") or name == k for k in groups):
            continue
        parts = name.split(".")
        key = next((".".join(parts[:i]) for i in range(1, len(parts))
                    if ".".join(parts[:i]) in modules and all(n in unplaced for n in under(".".join(parts[:i])))), name)
        block = next((".".join(parts[:i]) for i in range(1, len(parts))
                      if type(modules.get(".".join(parts[:i]))).__name__ in keep_whole), None)
        if block is not None and len(block) <= len(key):  # both prefix `name`: the key lies inside the block
            key = block
        inside = [device_of[n] for n in under(key) if device_of.get(n) is not None]
        if inside:  # a no-split block with a placed part: keep it whole there
            groups[key] = (inside[0], next(owner[n] for n in under(key) if device_of.get(n) is not None))
            continue
        first = names.index(name)
        before = [i for i in placed if i < first]
        after = [i for i in placed if i > first]
        j = before[-1] if before else (after[0] if after else None)
        groups[key] = ("cpu", None) if j is None else (device_of[names[j]], owner[names[j]])
    return [(k, d, nb) for k, (d, nb) in groups.items()]


def _check_devices(model, device_map, where, owner, device_of, no_split_module_classes, mode) -> list[Finding]:
    """Bad device values, devices absent here (run mode), keys matching no module, tensors with no device."""
    out = []
    for key, value in device_map.items():
        if where[key] is None:
            why = ("the meta device holds no data" if str(value).startswith("meta")
                   else "not a device accelerate loads to")
            out.append(Finding("unknown-device", f"device_map[{key!r}] = {value!r}: {why}.",
                               f"map {key!r} to a GPU id (0, 1, ...), 'cpu' or 'disk' (or an accelerator accelerate "
                               f"knows: 'mps', 'xpu:0', 'npu:0', ...)."))
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
        for dev in sorted({d for d in where.values() if isinstance(d, str) and d not in ("cpu", "disk")}):
            present, how = _accelerator_here(dev)
            if not present:
                keys = [k for k, d in where.items() if d == dev]
                out.append(Finding(
                    "absent-device", f"the map puts {len(keys)} module(s) (e.g. {keys[0]!r}) on {dev}, but this "
                    f"machine has no such device ({how}).",
                    f"move them to a device that exists here ({here}), or use mode='plan' for a machine you "
                    f"don't have."))
    modules = dict(model.named_modules())
    # accelerate's maps also name single tensors that sit directly on a module (CLIPModel's logit_scale)
    tensors = {n for n, _ in model.named_parameters(remove_duplicate=False)} | {n for n, _ in model.named_buffers()}
    unknown = [k for k in device_map if k != "" and k not in modules and k not in tensors]
    if unknown:
        out.append(Finding(
            "unknown-module",
            f"{len(unknown)} map key(s) match no module of the model: {', '.join(map(repr, unknown[:5]))}.",
            "use names from model.named_modules() (print(model) shows them); check for a missing 'model.' prefix."))
    n_unplaced = sum(1 for k in owner.values() if k is None)
    if n_unplaced:
        groups = _unplaced_groups(model, list(owner), owner, device_of, no_split_module_classes)
        shown = groups[:6]
        more = f" (and {len(groups) - 6} more)" if len(groups) > 6 else ""
        adds = "; ".join(
            f"device_map[{k!r}] = {d!r}" + (
                "" if nb is None else
                f" (where its part {nb!r} already is, so it stays whole)" if nb.startswith(k + ".") else
                f" (where its neighbour {nb!r} is)")
            for k, d, nb in shown)
        out.append(Finding(
            "unplaced", f"{n_unplaced} tensor(s) have no device, in {len(groups)} module(s) the map misses: "
            f"{', '.join(k for k, _, _ in shown)}{more}.",
            f"add {adds}{more}; or a catch-all key \"\" for whatever is left."))
    return out


def _loaded_but_empty(model) -> bool:
    """True for a model that came out of ``from_pretrained`` but has every parameter on meta and no offload hooks.

    transformers 5 marks what it loaded: parameters get ``_is_hf_initialized``,
    the model ``_weight_conversions``. A skeleton from ``from_config`` has
    neither (it is meta by construction); a model offloaded by
    ``from_pretrained`` has ``hf_device_map`` and accelerate's hooks.
    """
    params = list(model.parameters())
    if not params or not all(p.is_meta for p in params):
        return False
    loaded = getattr(model, "_weight_conversions", None) is not None or any(
        getattr(p, "_is_hf_initialized", False) for p in params)
    offloaded = getattr(model, "hf_device_map", None) is not None or any(
        hasattr(m, "_hf_hook") for m in model.modules())
    return loaded and not offloaded


_LOAD_FOR_REAL = ("load it without init_empty_weights: from_pretrained(path, device_map=..., max_memory=...) "
                  "reads the weights itself; or load the checkpoint into this skeleton: model.tie_weights(), "
                  "then accelerate's load_checkpoint_and_dispatch(model, path, device_map=...) "
                  "(or load_checkpoint_in_model)")


def _all_meta_finding(model) -> Finding:
    n = sum(1 for _ in model.parameters())
    return Finding(
        "all-meta", f"all {n} parameters are on the meta device although the model came out of from_pretrained: it was "
        f"loaded inside init_empty_weights, so its weights were never loaded (a forward fails: 'Tensor on device "
        f"meta is not on the expected device').",
        _LOAD_FOR_REAL + ".")


def _check_offload_folder(where, loader, offload_folder) -> list[Finding]:
    """accelerate's loaders refuse "disk" without a folder to offload to."""
    if loader not in ("load_checkpoint_and_dispatch", "dispatch_model") or offload_folder is not None:
        return []
    disk = [k for k, d in where.items() if d == "disk"]
    if not disk:
        return []
    kw = "offload_folder" if loader == "load_checkpoint_and_dispatch" else "offload_dir"
    said = ("'At least one of the model submodule will be offloaded to disk, please pass along an `offload_folder`.'"
            if loader == "load_checkpoint_and_dispatch" else
            "'We need an `offload_dir` to dispatch this model according to this `device_map`, the following "
            f"submodules need to be offloaded: {', '.join(disk)}.'")
    return [Finding(
        "no-offload-folder", f"the map puts {len(disk)} module(s) on disk (e.g. {disk[0]!r}) but no offload folder is "
        f"given: {loader} refuses ({said}).",
        f"pass {kw}=<a folder with room for them> to {loader} (and offload_folder= to preflight), e.g. "
        f"{kw}=helpers.checkpoints.offload_folder('run'); or map those modules to 'cpu' or a GPU.")]


def _check_ties(model, device_map, device_of, ckpt, loaded_empty=False) -> list[Finding]:
    """Every declared tied pair: tie lost on meta, ends on different devices, keys absent from the checkpoint."""
    out = []
    params = dict(model.named_parameters(remove_duplicate=False))
    pairs = [(t, s) for t, s in _declared_ties(model) if t in params and s in params]
    for target, source in pairs:
        td, sd = device_of.get(target), device_of.get(source)
        if params[target] is not params[source] and params[target].is_meta and params[source].is_meta:
            extra = ""
            if ckpt is not None and (target not in ckpt or source not in ckpt):
                absent = target if target not in ckpt else source
                extra = (f" The checkpoint has no {absent!r}, so it would stay on the meta device "
                         f"('Cannot copy out of meta tensor; no data!').")
            if loaded_empty:  # from_pretrained inside init_empty_weights: tying two empty tensors loads nothing
                fix = ("this model came out of from_pretrained inside init_empty_weights, so tie_weights() alone "
                       "leaves it empty (every weight on meta). To plan with it, call model.tie_weights() and plan "
                       "the map again; to run it, " + _LOAD_FOR_REAL + ".")
            else:
                fix = ("call model.tie_weights() after building the empty model (or build it under "
                       "torch.device('meta')), then plan the map again.")
            out.append(Finding(
                "tie-lost", f"{target} and {source} are declared tied but are separate parameters (the tie is lost, "
                f"e.g. by init_empty_weights): sizes count the pair twice and a map may split it.{extra}", fix))
        if td is not None and sd is not None and td != sd:
            out.append(Finding(
                "tied-split",
                f"tied parameters {target} ({device_label(td)}) and {source} ({device_label(sd)}) are on different "
                f"devices.",
                f"map the modules of both to one device that holds weights in memory, e.g. "
                f"{owner_key(target, device_map)!r} and {owner_key(source, device_map)!r} both to "
                f"{sd if sd != 'disk' else 'cpu'!r}; offload decoder layers instead."))
        if ckpt is None:
            continue
        for name, dev, other in ((target, td, source), (source, sd, target)):
            if name not in ckpt and other in ckpt and dev == "disk":
                out.append(Finding(
                    "tied-missing", f"{name} is not in the checkpoint (it is filled from {other} by the tie) and the "
                    f"map puts it on disk: the offload index gets no entry for it and the forward pass fails with "
                    f"KeyError: {name!r}.",
                    f"keep {owner_key(name, device_map)!r} and {owner_key(other, device_map)!r} in memory (a GPU or "
                    f"'cpu'); offload decoder layers instead."))
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
    """No-split class names that match nothing; no-split modules (the model's own always included) cut across
    devices."""
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
    """Bytes of weights per device against max_memory (disk without a budget is unlimited).

    "xpu:N" and the other accelerator strings draw on the budget of GPU id N,
    as accelerate's integer ids name the machine's accelerators.
    """
    out = []
    if not budget:
        return out
    shared: dict = {}  # budget key -> [devices of the map that draw on it]
    for dev in used:
        shared.setdefault(budget_key(dev), []).append(dev)
    for key, devs in shared.items():
        n = sum(used[d] for d in devs)
        label = " + ".join(device_label(d) for d in devs)
        if key not in budget and key != "disk":
            out.append(Finding("no-budget",
                               f"the map uses {label} ({format_size(n)}) but max_memory gives it no budget.",
                               f"add {key!r} to max_memory or move its modules to a budgeted device."))
        elif key in budget and n > budget[key]:
            over = format_size(n - budget[key])
            out.append(Finding(
                "over-budget", f"{label} gets {format_size(n)} of weights but its budget is {format_size(budget[key])} "
                f"(over by {over}).",
                f"move about {over} of modules (e.g. whole decoder layers) from {label} to another device, "
                f"or raise max_memory[{key!r}]."))
    return out


def _check_quantized(model, where, hf_quantizer) -> list[Finding]:
    """bitsandbytes and offload: what transformers 5.24 refuses, and what llm_int8_enable_fp32_cpu_offload really does.

    Without the flag, ``from_pretrained`` refuses a map that sends modules to "cpu" or "disk" (unless
    everything is on "cpu"): ``validate_environment`` in ``quantizers/quantizer_bnb_4bit.py`` (and
    ``_8bit``). With the flag and a ``device_map`` dict, ``_process_model_before_weight_loading`` adds
    every key mapped to "cpu" or "disk" to the modules not converted: they stay unquantized, in the load
    dtype (``dtype=``, else the checkpoint's), not float32. A map without a GPU then quantizes nothing.
    A model whose quantized (bitsandbytes) layers are mapped to "cpu" or "disk" anyway was prepared
    before its map was a dict (``device_map="auto"``): the flag did nothing for them.
    """
    qc = _quant_config(model, hf_quantizer)
    get = (lambda k: qc.get(k)) if isinstance(qc, dict) else (lambda k: getattr(qc, k, None))  # noqa: E731
    method = get("quant_method") if qc is not None else None
    if not str(getattr(method, "value", method)).startswith("bitsandbytes"):
        return []
    values = {d for d in where.values() if d is not None}
    offloaded = {"cpu", "disk"} & values
    recipe = ("BitsAndBytesConfig(..., llm_int8_enable_fp32_cpu_offload=True) with a device_map dict that puts whole "
              "decoder layers on 'cpu': transformers then leaves the modules it maps to 'cpu' or 'disk' unquantized, "
              "in the load dtype (dtype=, else the checkpoint's; not float32)")
    if not get("llm_int8_enable_fp32_cpu_offload"):
        if values != {"cpu"} and offloaded:
            return [Finding(
                "quantized-offload", f"the model is quantized with bitsandbytes and the map sends modules to "
                f"{' and '.join(sorted(offloaded))}: from_pretrained refuses, with the ValueError of the bitsandbytes "
                f"quantizer's validate_environment whose first sentence is 'Some modules are dispatched on the CPU or "
                f"the disk.'",
                "give it room: a budget that holds the whole quantized model on the GPU(s), or on a machine without a "
                "GPU everything on the CPU (device_map={'': 'cpu'} with enough max_memory['cpu']); or, with a GPU, "
                f"the refusal's own remedy: {recipe}.")]
        return []
    modules = dict(model.named_modules())
    quantized = [n for n, m in modules.items() if type(m).__name__ in ("Linear4bit", "Linear8bitLt")]
    owner = {n: owner_key(n, where) for n in quantized}
    moved = [n for n in quantized if owner[n] is not None and where[owner[n]] in ("cpu", "disk")]
    if moved:
        devs = " and ".join(sorted({where[owner[n]] for n in moved}))
        return [Finding(
            "quantized-offload", f"llm_int8_enable_fp32_cpu_offload is set, yet {len(moved)} bitsandbytes-quantized "
            f"module(s) (e.g. {moved[0]!r}) are mapped to {devs}: the flag acts only on a device_map dict given to "
            f"from_pretrained (a string such as 'auto' is planned after the quantizer ran), so these weights stay "
            f"quantized and offloaded, and generating fails (notebook 08, case 9).",
            f"pass {recipe}.")]
    accelerators = [d for d in values if isinstance(d, int) or d not in ("cpu", "disk")]
    if not accelerators:
        return [Finding(
            "quantized-offload", f"llm_int8_enable_fp32_cpu_offload is set and the map puts every module on "
            f"{' and '.join(sorted(offloaded))}: transformers leaves every module mapped there unquantized, in the "
            f"load dtype, so nothing is quantized and no memory is saved.",
            "on a machine without a GPU drop the flag and keep the quantized model whole on the CPU "
            "(device_map={'': 'cpu'} with enough max_memory['cpu']); on a GPU machine map decoder layers to the GPU.")]
    return []


def _quantized_format(qc) -> str | None:
    """"int8", "nf4" or "nf4-dq" for a bitsandbytes config that quantizes while loading, else None."""
    get = (lambda k: qc.get(k)) if isinstance(qc, dict) else (lambda k: getattr(qc, k, None))  # noqa: E731
    if qc is None or get("load_in_8bit"):
        return "int8" if qc is not None else None
    if get("load_in_4bit"):
        return "nf4-dq" if get("bnb_4bit_use_double_quant") else "nf4"
    return None


def _check_peaks(model, device_of, budget, hf_quantizer, prompt, batch, context) -> list[Finding]:
    """The two transient peaks against each device's budget: the load peak (quantizing while loading) and the
    prefill activation peak (with ``prompt``). Devices are those of the map; sizes add the scales back."""
    from .memory import QUANTIZE_BYTES_PER_WEIGHT, kv_cache_layers, linear_bytes_per_weight, prefill_peak_bytes

    if not budget:
        return []
    if prompt is not None and (isinstance(prompt, bool) or not isinstance(prompt, int) or prompt < 0
                               or isinstance(batch, bool) or not isinstance(batch, int) or batch < 1):
        raise ValueError(f"prompt must be a whole number of tokens >= 0 and batch >= 1, not prompt={prompt!r}, "
                         f"batch={batch!r}")
    quantizer = hf_quantizer or getattr(model, "hf_quantizer", None)
    fmt = _quantized_format(_quant_config(model, hf_quantizer))
    on_the_fly = fmt is not None and quantizer is not None and not getattr(quantizer, "pre_quantized", True)
    sizes = tensor_sizes(model, None, quantizer)
    weights: dict = {}
    for name, dev in device_of.items():
        if dev is not None and name in sizes:
            weights[dev] = weights.get(dev, 0) + sizes[name]
    largest: dict = {}
    for mname, m in model.named_modules():
        if fmt and type(m).__name__ in ("Linear4bit", "Linear8bitLt"):
            dev = device_of.get(f"{mname}.weight")
            n = m.in_features * m.out_features
            counted = 1.0 if fmt == "int8" else 0.5
            weights[dev] = weights.get(dev, 0) + n * (linear_bytes_per_weight(fmt, m.in_features) - counted)
            largest[dev] = max(largest.get(dev, 0), n)
    out = []
    gpus = sorted((d for d in weights if d not in ("cpu", "disk") and d is not None), key=device_order)
    for dev in gpus + [d for d in ("cpu",) if d in weights]:
        key = budget_key(dev)
        if not on_the_fly or key not in budget:
            continue
        per = QUANTIZE_BYTES_PER_WEIGHT["cpu" if dev == "cpu" else "cuda"].get(fmt, 0)
        peak = weights[dev] + largest.get(dev, 0) * per
        if peak > budget[key]:
            out.append(Finding(
                "load-peak", f"loading quantizes one weight at a time on {device_label(dev)}: its weights with scales "
                f"({format_size(weights[dev])}) plus the temporaries of its largest quantized weight "
                f"({format_size(largest.get(dev, 0) * per)}) peak at {format_size(peak)}, above its budget of "
                f"{format_size(budget[key])}.",
                f"move a decoder layer off {device_label(dev)} (a lower max_memory[{key!r}] when planning), give it "
                f"more memory, or load a checkpoint saved already quantized (no temporaries: save_pretrained "
                f"after quantizing once, on another machine if need be)."))
    config = getattr(model, "config", None)
    if prompt is None or config is None:
        return out
    layers = [n for n, m in model.named_modules()
              if type(m).__name__ in set(getattr(model, "_no_split_modules", None) or [])
              and n.rsplit(".", 1)[-1].isdigit()]
    layer_dev = [next((d for t, d in device_of.items() if t.startswith(n + ".") and d is not None), None)
                 for n in layers]
    first_gpu = gpus[0] if gpus else "cpu"
    runs = [first_gpu if d in ("cpu", "disk") and gpus else d for d in layer_dev]
    per_layer = kv_cache_layers(config, prompt if context is None else context, batch)
    dtype_bytes = next((p.element_size() for p in model.parameters() if p.is_floating_point()), 2)
    act = prefill_peak_bytes(config, prompt, batch, bytes_per_value=min(dtype_bytes, 4))
    for dev in dict.fromkeys(runs):
        key = budget_key(dev) if dev is not None else None
        if key not in budget:
            continue
        kv = sum(b for b, d in zip(per_layer, layer_dev) if d == dev)
        total = weights.get(dev, 0) + kv + act
        if total > budget[key]:
            out.append(Finding(
                "prefill-peak", f"{device_label(dev)} runs decoder layers: weights with scales "
                f"{format_size(weights.get(dev, 0))} + KV cache {format_size(kv)} + prefill activations of "
                f"{prompt:,} tokens x {batch} {format_size(act)} = {format_size(total)}, above its budget of "
                f"{format_size(budget[key])}.",
                f"prefill a shorter prompt or fewer sequences at once (smaller batch, or max_batch in a server; "
                f"activations grow with prompt x batch), move layers off {device_label(dev)}, or give it more memory."))
    return out
