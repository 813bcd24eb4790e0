"""Remote code shipped into ``llama_alcot`` exports (``auto_map``), plus helpers for the converter.

    from megatron_alcot.hf import REMOTE_CODE_FILES, copy_remote_code
    copy_remote_code("hf_out")       # writes configuration_llama_alcot.py + modeling_llama_alcot.py

``configuration_llama_alcot.py`` and ``modeling_llama_alcot.py`` import only torch and transformers,
so the copies in an export directory work without megatron_alcot installed.
"""
import os
import shutil

HERE = os.path.dirname(os.path.abspath(__file__))
REMOTE_CODE_FILES = ("configuration_llama_alcot.py", "modeling_llama_alcot.py")


def copy_remote_code(target_dir: str) -> list:
    """Copy the remote-code files into ``target_dir``; returns the written paths."""
    written = []
    for name in REMOTE_CODE_FILES:
        dst = os.path.join(target_dir, name)
        shutil.copyfile(os.path.join(HERE, name), dst)
        written.append(dst)
    return written


def export_max_latent_steps(config) -> int:
    """ℓmax of a loaded export's config, read from its keys, so exports of every version agree
    (plain LLaMA: 0)::

        export_max_latent_steps(AutoConfig.from_pretrained(hf_dir, trust_remote_code=True))
    """
    if getattr(config, "latent_method", "vanilla") == "vanilla":
        return 0
    return int(config.latent_max_steps)
