# The environment every run of the workbook's notebooks uses (sourced by workbook.sh and
# gpu-reference/tools/gpu_reference.sh): the quiet settings the committed outputs were made with
# (docs/writing-notebooks.md), offline, and NVLink multicast off on shared multi-GPU hosts
# (helpers/launch.py's SAFE_ENV holds the same three for processes a notebook launches).
export HF_HUB_DISABLE_PROGRESS_BARS=1 TQDM_DISABLE=1 TRANSFORMERS_VERBOSITY=error \
       TOKENIZERS_PARALLELISM=false JUPYTER_PLATFORM_DIRS=1 PYTHONHASHSEED=0 \
       HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1} PYDEVD_DISABLE_FILE_VALIDATION=1
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
