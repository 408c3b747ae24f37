# ptx-node GPU worker: runs the model on one NVIDIA GPU.
# The PyPI torch 2.14.1 wheel carries its own CUDA 13 runtime libraries (nvidia-* wheels),
# so the image needs only a CUDA base with the driver hooks; the host needs an NVIDIA
# driver new enough for CUDA 13 and the NVIDIA Container Toolkit.
# Build from the repository root:  docker build -f deploy/docker/gpu-worker.Dockerfile -t ptx-node-gpu-worker .
ARG CUDA_IMAGE=nvidia/cuda:13.0.0-base-ubuntu24.04
FROM ${CUDA_IMAGE}

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PTX_NODE_CONFIG=/etc/ptx-node/node.toml \
    PATH=/opt/ptx-node/bin:$PATH

RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
      python3 python3-venv libglib2.0-0 fonts-dejavu-core \
 && rm -rf /var/lib/apt/lists/* \
 && python3 -m venv /opt/ptx-node

WORKDIR /src
RUN pip install torch==2.14.1 torchvision==0.29.1
COPY pyproject.toml README.md ./
RUN python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml','rb'))['project']['dependencies']))" \
      > /tmp/requirements.txt \
 && pip install -r /tmp/requirements.txt
COPY model ./model
COPY node ./node
COPY trainer ./trainer
RUN pip install --no-deps . && rm -rf /src

RUN useradd --system --uid 10001 --home-dir /var/lib/ptx-node --create-home ptx \
 && mkdir -p /etc/ptx-node /var/lib/ptx-node/spool && chown -R ptx /var/lib/ptx-node
USER ptx
WORKDIR /var/lib/ptx-node

ENV NVIDIA_VISIBLE_DEVICES=all NVIDIA_DRIVER_CAPABILITIES=compute,utility
CMD ["sh", "-c", "exec ptx-node worker --config \"$PTX_NODE_CONFIG\" --device cuda"]
