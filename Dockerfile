# Image for the tldr search and re-audit (Ray head, workers, KubeRay's submitter Job, the re-audit
# CronJob). MLflow has its own image: Dockerfile.mlflow. Build from the repository root:
#   CUDA (default PyPI torch wheels, for the gpu overlay):
#     docker build -t ghcr.io/example/tldr:0.1.0 .
#   CPU only (much smaller, for the cpu-dev overlay):
#     docker build --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu \
#       -t ghcr.io/example/tldr:0.1.0-cpu .
FROM python:3.11-slim

ARG TORCH_INDEX_URL=""

ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# wget: KubeRay's default health probes for Ray pods call it.
RUN apt-get update \
    && apt-get install -y --no-install-recommends wget \
    && rm -rf /var/lib/apt/lists/*

# torch first, as the README does, in its own layer (the biggest and most stable one).
RUN pip install ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"} \
    torch==2.14.1 torchvision==0.29.1

# The code lives in the image: KubeRay's K8sJobMode does not upload a local working_dir.
WORKDIR /app
COPY . /app
# The project, non-editable (the commands import the installed package; /app only holds tune/),
# with its platform extra (ray[tune], optuna, mlflow, psycopg2-binary, requests) and its cluster
# extra (ray[default,tune] pinned to the manifests' rayVersion: the dashboard and Jobs API that
# KubeRay's RayJob submits through), plus boto3 (pyarrow/boto3 S3 access for Ray Tune storage and
# the bucket Job).
RUN pip install ".[platform,cluster]" boto3 \
    && rm -rf build ./*.egg-info

# Pods run with a read-only root file system: every path a program writes to comes from these
# variables and is a volume in the pod (k8s/base/kustomization.yaml sets the same values):
# HOME and TMPDIR (Ray's session folder /tmp/ray, matplotlib, MLflow temp files) in /tmp, the runs
# folder and its classifier cache in /runs, the data sets in /data. Nothing is written under /app.
ENV HOME=/tmp \
    TMPDIR=/tmp \
    MPLCONFIGDIR=/tmp/matplotlib \
    TLDR_RUNS=/runs \
    TLDR_CACHE=/runs/cache \
    TLDR_DATA_ROOT=/data
# The mount points exist (and are the app user's) so that `docker run` without volumes works too.
RUN groupadd --gid 1000 app \
    && useradd --uid 1000 --gid 1000 --no-create-home --home-dir /tmp --shell /bin/bash app \
    && mkdir -p /runs /data \
    && chown 1000:1000 /runs /data
USER 1000:1000

CMD ["python", "tune/search.py", "--help"]
