# The cluster image: Ray's own GPU image for the pinned Ray and Python, plus manifoldgd and its locked GPU
# dependency set (requirements/lock-gpu.txt), installed by scripts/install.sh, the same script the Makefile
# and CI's wheel test run. Presets, the built-in dataset and its prior are package data inside it.
#
#   REGISTRY=ghcr.io/your-org            # any registry your cluster can pull from
#   docker build -t $REGISTRY/manifoldgd:0.1.0 .
#   docker push $REGISTRY/manifoldgd:0.1.0
#
# RAY_IMAGE must match pyproject.toml's ray pin and a Python the lock was made for (3.11); torch 2.13.0 brings
# its own CUDA 13 libraries, so the nodes need an NVIDIA driver that supports CUDA 13.
ARG RAY_IMAGE=rayproject/ray:2.60.0-py311-gpu
FROM ${RAY_IMAGE}

# The Ray image runs as user `ray` (uid 1000, gid 100) with its Python on PATH. Only what the install needs is
# copied (.dockerignore); pip builds the wheel from it and the copy is removed.
COPY --chown=1000:100 . /tmp/manifoldgd-src
RUN bash /tmp/manifoldgd-src/scripts/install.sh --gpu --python python /tmp/manifoldgd-src \
    && rm -rf /tmp/manifoldgd-src "$HOME/.cache/pip" \
    && manifoldgd --help > /dev/null \
    && manifoldgd print-config --config imagenet1k_ipc50 > /dev/null

ENV RAY_USAGE_STATS_ENABLED=0
