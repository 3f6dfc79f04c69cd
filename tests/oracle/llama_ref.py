"""Opens the reference implementation (llama.cpp via llama-cpp-python) the same way everywhere.

llama.cpp's AMX matrix path (an "extra buffer type") crashes with SIGSEGV on the Sapphire Rapids
virtual machines we test on (the guest does not grant the AMX tile state). Turning extra buffer
types off (`use_extra_bufts = False`) keeps llama.cpp on its regular AVX-512/VNNI kernels, which
is also what its CPU backend uses on any machine without AMX. llama-cpp-python does not expose
the flag, so we wrap its default-parameter factory.
"""
import llama_cpp
import llama_cpp.llama_cpp as _c

_orig_default_params = _c.llama_model_default_params


def _default_params_without_extra_bufts():
    p = _orig_default_params()
    if hasattr(p, "use_extra_bufts"):
        p.use_extra_bufts = False
    return p


_c.llama_model_default_params = _default_params_without_extra_bufts


GGML_TYPE_F32 = 0


def open_llama(model_path, f32_kv=False, **kw):
    """f32_kv: keep llama.cpp's KV cache in float32 like dmsrt's CPU store (its default is f16,
    whose rounding grows with the context and would dominate a logit comparison)."""
    kw.setdefault("verbose", False)
    if f32_kv:
        kw.update(type_k=GGML_TYPE_F32, type_v=GGML_TYPE_F32, flash_attn=False)
    return llama_cpp.Llama(model_path=model_path, **kw)
