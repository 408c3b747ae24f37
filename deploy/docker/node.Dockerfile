# ptx-node: the DICOM listener (C-STORE SCP), STOW-RS intake, status page, /metrics and
# the sweeper. No model runs here in production (worker.embedded_workers = 0).
# Build from the repository root:  docker build -f deploy/docker/node.Dockerfile -t ptx-node .
FROM python:3.11-slim-bookworm

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PTX_NODE_CONFIG=/etc/ptx-node/node.toml

# glib for OpenCV, a TTF font for the overlay legend.
RUN apt-get update \
 && apt-get install -y --no-install-recommends libglib2.0-0 fonts-dejavu-core \
 && rm -rf /var/lib/apt/lists/*

WORKDIR /src
# CPU build of the pinned torch: the node image needs no CUDA libraries.
RUN pip install --index-url https://download.pytorch.org/whl/cpu torch==2.14.1 torchvision==0.29.1
# Dependencies before the code, so a code change does not reinstall them.
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

# DICOM (C-STORE SCP) and HTTP (status page, /metrics, STOW-RS).
EXPOSE 11112 8080
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s \
  CMD python -c "import urllib.request,sys; sys.exit(urllib.request.urlopen('http://127.0.0.1:8080/healthz', timeout=4).status != 200)"
CMD ["sh", "-c", "exec ptx-node serve --config \"$PTX_NODE_CONFIG\""]
