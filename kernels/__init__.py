"""Triton kernels of fastgpt (installed as fastgpt.kernels): fused attention forward, backward and
split-K decode. The host functions are in fastgpt.kernels.attention."""
