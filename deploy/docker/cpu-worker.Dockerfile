# ptx-node CPU worker: runs the model on CPU (a box without a GPU, or extra capacity).
# Build from the repository root:  docker build -f deploy/docker/cpu-worker.Dockerfile -t ptx-node-cpu-worker .
FROM python:3.11-slim-bookworm

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PTX_NODE_CONFIG=/etc/ptx-node/node.toml \
    OMP_NUM_THREADS=4

RUN apt-get update \
 && apt-get install -y --no-install-recommends libglib2.0-0 fonts-dejavu-core \
 && rm -rf /var/lib/apt/lists/*

WORKDIR /src
RUN pip install --index-url https://download.pytorch.org/whl/cpu torch==2.14.1 torchvision==0.29.1
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

CMD ["sh", "-c", "exec ptx-node worker --config \"$PTX_NODE_CONFIG\" --device cpu"]
