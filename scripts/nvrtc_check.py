#!/usr/bin/env python3
"""Compile-checks CUDA kernel sources with NVRTC from the nvidia-cuda-nvrtc wheel (no GPU needed).

Usage: nvrtc_check.py [--arch compute_90] KERNEL.cu ...
A `#include "x.cuh"` resolves against the kernel's own folder, as the binary's loader does.
Exits 1 if any kernel fails to compile, printing NVRTC's log.
"""
import ctypes
import glob
import os
import sys


def load_nvrtc():
    import nvidia  # the wheel's namespace package

    for root in nvidia.__path__:
        for lib in sorted(glob.glob(os.path.join(root, "cu*", "lib", "libnvrtc.so.*"))):
            if ".alt." not in lib:
                # NVRTC dlopens its builtins by soname: load them first, globally.
                libdir = os.path.dirname(lib)
                for builtins in glob.glob(os.path.join(libdir, "libnvrtc-builtins.so.*")):
                    if ".alt." not in builtins:
                        ctypes.CDLL(builtins, mode=ctypes.RTLD_GLOBAL)
                return ctypes.CDLL(lib)
    sys.exit("nvrtc_check: libnvrtc not found in the nvidia-cuda-nvrtc wheel")


def check(nvrtc, path, arch):
    src = open(path, "rb").read()
    prog = ctypes.c_void_p()
    rc = nvrtc.nvrtcCreateProgram(ctypes.byref(prog), src, os.path.basename(path).encode(), 0, None, None)
    if rc != 0:
        return False, f"nvrtcCreateProgram failed ({rc})"
    opts = [f"--gpu-architecture={arch}".encode(), b"--std=c++17", f"-I{os.path.dirname(os.path.abspath(path))}".encode()]
    arr = (ctypes.c_char_p * len(opts))(*opts)
    rc = nvrtc.nvrtcCompileProgram(prog, len(opts), arr)
    size = ctypes.c_size_t()
    nvrtc.nvrtcGetProgramLogSize(prog, ctypes.byref(size))
    log = ctypes.create_string_buffer(size.value)
    nvrtc.nvrtcGetProgramLog(prog, log)
    nvrtc.nvrtcDestroyProgram(ctypes.byref(prog))
    return rc == 0, log.value.decode(errors="replace").strip()


def main(argv):
    arch = "compute_90"
    if len(argv) > 1 and argv[0] == "--arch":
        arch, argv = argv[1], argv[2:]
    if not argv:
        sys.exit("usage: nvrtc_check.py [--arch compute_90] KERNEL.cu ...")
    nvrtc = load_nvrtc()
    major, minor = ctypes.c_int(), ctypes.c_int()
    nvrtc.nvrtcVersion(ctypes.byref(major), ctypes.byref(minor))
    failed = 0
    for path in argv:
        ok, log = check(nvrtc, path, arch)
        print(f"{'ok  ' if ok else 'FAIL'} {path} (NVRTC {major.value}.{minor.value}, {arch})")
        if log:
            print(log)
        failed += not ok
    print(f"{len(argv) - failed} passed, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
