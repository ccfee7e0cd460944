# syntax=docker/dockerfile:1
# The cluster image: Ray's CPU image for the pinned Ray and Python, plus manifoldgd and its locked GPU dependency
# set (requirements/lock-gpu.txt = lock-runtime.txt, which has no test or lint tools, + torch's CUDA 13 wheels),
# installed by scripts/install.sh with --check (the same script the Makefile and CI's wheel test run).
# Presets, the built-in dataset and its prior are package data inside it. BuildKit (Docker 23 or newer) builds it:
#
#   REGISTRY=ghcr.io/your-org            # any registry your cluster can pull from
#   docker build --platform linux/amd64 -t $REGISTRY/manifoldgd:0.1.0 .
#   docker push $REGISTRY/manifoldgd:0.1.0
#
# One CUDA. The base has no CUDA toolkit (Ray's `-gpu` images bring CUDA 12, a second CUDA beside torch's): CUDA 13
# comes only from the wheels torch 2.13.0 pins (cuda-toolkit 13.0.x, cuDNN, NCCL). The node's driver library
# (libcuda) is mounted in by the NVIDIA container toolkit, which NVIDIA_DRIVER_CAPABILITIES asks for compute.
# NVIDIA_VISIBLE_DEVICES is left to the device plugin, so a pod sees only the GPUs it was given.
# Driver: every GPU node needs NVIDIA driver 580.65.06 or newer, the minimum NVIDIA's CUDA 13.0 release notes give
# for Linux x86_64; on an older driver torch finds no usable GPU.
# One CuPy. Ray's images install ray[all], whose metadata pulls cupy-cuda12x; it is removed before the lock adds
# cupy-cuda13x (both would unpack into the same cupy/ folder). tests/test_image.py checks the lock and the base.
ARG RAY_IMAGE=rayproject/ray:2.60.0-py311-cpu
FROM ${RAY_IMAGE}

SHELL ["/bin/bash", "-o", "pipefail", "-c"]
ENV NVIDIA_DRIVER_CAPABILITIES=compute,utility \
    RAY_USAGE_STATS_ENABLED=0 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# 1. The dependencies, from the lock alone (only requirements/ and the install script are mounted): this layer is
#    rebuilt when the lock changes, not when the code does. The image runs as Ray's user `ray` (uid 1000, gid 100).
RUN --mount=type=bind,source=requirements,target=/tmp/deps/requirements \
    --mount=type=bind,source=scripts/install.sh,target=/tmp/deps/scripts/install.sh \
    python -m pip uninstall -y cupy-cuda12x \
    && bash /tmp/deps/scripts/install.sh --gpu --deps-only --check --python python

# 2. The code: the build context (.dockerignore admits only what the install needs) is mounted, not copied, so no
#    layer keeps the sources; pip builds the wheel from a scratch copy that is removed in the same step.
RUN --mount=type=bind,target=/tmp/context \
    cp -r /tmp/context /tmp/manifoldgd-src \
    && bash /tmp/manifoldgd-src/scripts/install.sh --no-lock --check --python python /tmp/manifoldgd-src \
    && rm -rf /tmp/manifoldgd-src \
    && manifoldgd --help > /dev/null \
    && manifoldgd print-config --config imagenet1k_ipc50 > /dev/null
