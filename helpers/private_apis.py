"""The private names of transformers, accelerate, bitsandbytes and torch that the workbook relies on, in one place.

Everything else the workbook calls in those libraries is public. Each entry below is a name with a
leading underscore, a monkey-patch, a logger name, a message text matched, a private function cited
in prose as where a behaviour lives, or a workaround of a library's behaviour. Each says where the
workbook uses it and why no public call does the same, and :data:`CHECKED_AGAINST` gives the versions
they were checked against.

``tests/test_private_apis.py`` checks every entry on the installed versions (the name is there, the
signature is the one read, the behaviour relied on still holds) and fails with a message that names
the entry, what changed and these versions. It also scans ``helpers/``, ``notebooks/*.py``,
``workers/``, ``tools/`` and ``gpu-reference/tools/`` for private names and monkey-patches that are
not listed here. CONTRIBUTING.md ("Private names of the libraries") says how to add one.
"""

from __future__ import annotations

from dataclasses import dataclass

CHECKED_AGAINST = {"transformers": "5.24.0", "accelerate": "1.15.0", "bitsandbytes": "0.50.2", "torch": "2.13.0+cpu"}
"""The library versions every entry of :data:`PRIVATE_NAMES` was read and tested against."""


@dataclass(frozen=True)
class PrivateName:
    """One private name the workbook relies on.

    Attributes:
        name: where it lives, dotted (``module.Class.attribute``), as the library spells it; an
            attribute a library sets on torch objects is named on the torch class.
        library: "transformers", "accelerate", "bitsandbytes" or "torch".
        kind: "attribute" (read), "function" (called), "monkey-patch" (a library's module attribute
            replaced), "logger" (a logger named after a module), "message text" (the start of a
            message matched), "cited" (named in prose as where a behaviour lives) or "workaround"
            (a library behaviour worked around).
        used_in: the files that use it.
        why: why no public call does it.
    """

    name: str
    library: str
    kind: str
    used_in: tuple[str, ...]
    why: str

    @property
    def short(self) -> str:
        """The last dotted part (``_no_split_modules``): what a use in the code spells."""
        return self.name.rsplit(".", 1)[-1]


PRIVATE_NAMES = (
    PrivateName(
        "transformers.PreTrainedModel._no_split_modules", "transformers", "attribute",
        ("helpers/planner.py", "helpers/preflight.py", "notebooks/02", "notebooks/03", "notebooks/05",
         "notebooks/06", "notebooks/08", "notebooks/09"),
        "the model class's own list of the blocks that must stay whole on one device (its decoder layer); "
        "from_pretrained plans with it (_get_device_map) and accelerate's documentation passes it as "
        "no_split_module_classes. transformers has no public getter."),
    PrivateName(
        "transformers.PreTrainedModel._no_placement_params", "transformers", "attribute",
        ("helpers/planner.py", "notebooks/03"),
        "optional (read with getattr, default None): _get_device_map passes it to infer_auto_device_map, "
        "and the planner repeats that step exactly."),
    PrivateName(
        "transformers.integrations.accelerate._get_device_map", "transformers", "function",
        ("helpers/planner.py", "notebooks/03", "notebooks/06", "notebooks/08", "tests/test_planner.py"),
        "the function from_pretrained computes its map with; notebook 03 checks the workbook's planner "
        "against it, on purpose (the reference, not a dependency of any helper)."),
    PrivateName(
        "transformers.integrations.accelerate.infer_auto_device_map", "transformers", "monkey-patch",
        ("notebooks/03",),
        "replaced for one call (try/finally) to record the map from_pretrained computed before it refuses "
        "a bitsandbytes model with offload: from_pretrained returns no map when it raises. _get_device_map "
        "looks the function up in its module at each call."),
    PrivateName(
        "transformers.distributed.mixin.DistributedMixin._resolve_parallel_plans", "transformers", "function",
        ("notebooks/07",),
        "the step from_pretrained(distributed_config=...) takes to turn the model's tensor-parallel plan, with "
        "the DistributedConfig's tp_plan override, into {module or parameter: style}, and to refuse an empty "
        "one; notebook 07 shows what each override resolves to without starting processes. No public call "
        "returns the resolved plan."),
    PrivateName(
        "transformers.PreTrainedModel._weight_conversions", "transformers", "attribute",
        ("helpers/preflight.py",),
        "set on a model by from_pretrained's loading (core_model_loading.py); with _is_hf_initialized, the "
        "only mark that tells a model from_pretrained loaded inside init_empty_weights (every weight on "
        "meta) from a from_config skeleton (preflight's 'all-meta' finding)."),
    PrivateName(
        "torch.nn.Parameter._is_hf_initialized", "transformers", "attribute",
        ("helpers/preflight.py",),
        "the flag from_pretrained sets on each parameter it loaded or initialised; see _weight_conversions."),
    PrivateName(
        "transformers.quantizers.quantizer_bnb_4bit.Bnb4BitHfQuantizer._process_model_before_weight_loading",
        "transformers", "cited",
        ("helpers/preflight.py", "notebooks/03", "notebooks/05", "notebooks/06", "notebooks/08"),
        "named in prose as where llm_int8_enable_fp32_cpu_offload acts (it adds the modules a device_map "
        "dict sends to 'cpu' or 'disk' to the modules not converted); the claim is re-checked here."),
    PrivateName(
        "transformers.quantizers.quantizer_gguf.GgufHfQuantizer.is_serializable", "transformers", "workaround",
        ("helpers/checkpoints.py",),
        "a model loaded from a GGUF file keeps its GGUF quantizer, whose is_serializable() is False, so "
        "save_pretrained refuses it although its weights are plain tensors; the converter sets "
        "model.hf_quantizer = None before saving."),
    PrivateName(
        "torch.nn.Module._hf_hook", "accelerate", "attribute",
        ("helpers/preflight.py", "notebooks/02", "notebooks/03", "notebooks/06"),
        "where add_hook_to_module keeps the hook it attached (dispatch_model attaches an AlignDevicesHook "
        "whose execution_device, offload and weights_map are public); notebook 02 teaches the hook. "
        "accelerate has no public getter."),
    PrivateName(
        "torch.nn.Module._old_forward", "accelerate", "attribute",
        ("notebooks/02",),
        "the module's own forward, kept by add_hook_to_module: notebook 02 calls it between the hook's "
        "pre_forward and post_forward to show what the hook adds."),
    PrivateName(
        "accelerate.utils.modeling.tqdm", "accelerate", "monkey-patch",
        ("helpers/quiet.py",),
        "load_state_dict makes its loading bar with disable=False, which wins over TQDM_DISABLE, and in a "
        "kernel with ipywidgets stores one widget per step in the notebook; accelerate offers no switch. "
        "Replaced only in quiet runs (TQDM_DISABLE set), and put back by known_warnings_silenced."),
    PrivateName(
        "accelerate.big_modeling", "accelerate", "message text",
        ("helpers/quiet.py",),
        "dispatch_model logs 'Some parameters are on the meta device because they were offloaded to the "
        "...' for every map that offloads; that is what offload means, so quiet.KNOWN_MESSAGES drops the "
        "messages that start with it (the logger's other messages still show)."),
    PrivateName(
        "accelerate.utils.modeling", "accelerate", "logger",
        ("helpers/quiet.py",),
        "quiet_planning raises this logger's level while planning for GPUs the machine lacks ('Device 0 "
        "is not available'); the logger is named after the module."),
    PrivateName(
        "transformers.integrations.accelerate", "transformers", "logger",
        ("helpers/quiet.py",),
        "quiet_planning raises this logger's level while planning ('Current model requires N bytes of "
        "buffer for offloaded layers'); the logger is named after the module."),
    PrivateName(
        "bitsandbytes.backends.cpu.ops", "bitsandbytes", "logger",
        ("helpers/quiet.py",),
        "quiet.KNOWN raises its level: offline, the optional faster CPU 4-bit kernel cannot be fetched "
        "and its own kernel runs."),
    PrivateName(
        "bitsandbytes.autograd._functions", "bitsandbytes", "logger",
        ("helpers/quiet.py",),
        "a private module, named by its logger: quiet.KNOWN raises its level (LLM.int8 on CPU logs a cast "
        "to float16 at every matmul)."),
    PrivateName(
        "torch._dynamo.utils.counters", "torch", "attribute",
        ("helpers/speed.py",),
        "compiled_graphs reads counters['stats']['unique_graphs'] to show that a compiled path really ran "
        "(the count rises during the warm-up, not during the timed repeats); torch has no public count of "
        "compiled graphs (torch.compiler offers stances and resets, not counts)."),
    PrivateName(
        "torch._inductor.config.coordinate_descent_tuning", "torch", "monkey-patch",
        ("notebooks/04",),
        "notebook 04 sets inductor's tuning switch as an attribute of torch._inductor.config, the way gpt-fast "
        "sets it, and restores it afterwards. The public spelling is torch.compile(options=...), which "
        "generate reaches through CompileConfig(mode=None, options=...) (tools/bench.py uses that): options "
        "and a mode cannot be combined, so the options must spell out what the mode meant."),
    PrivateName(
        "torch.utils._pytree", "torch", "logger",
        ("helpers/quiet.py",),
        "torchao 0.18 registers its enums with torch's pytree the way older torch needed; torch 2.13 logs "
        "'<enum ...> is an Enum subclass and is now natively supported by torch.compile' once per enum and "
        "process, when transformers imports torchao. quiet.KNOWN_MESSAGES drops those messages only (the logger is "
        "named after the module)."),
)
"""Every private name the workbook relies on (``tests/test_private_apis.py`` checks each)."""
