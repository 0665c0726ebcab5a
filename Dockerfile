# Image for the tldr search (Ray head/workers), the MLflow tracking server and the
# re-audit CronJob. Build from the repository root:
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
# The project, non-editable, with its platform extra (ray[tune], optuna, mlflow, psycopg2-binary,
# requests: see pyproject.toml), plus the PostgreSQL driver (also in the extra) and boto3 the MLflow
# server needs for its stores. The commands find the installed package: tune/search.py and
# tune/reaudit.py only fall back to /app when tldr_core is not installed.
RUN pip install .[platform] psycopg2-binary boto3 \
    && rm -rf build ./*.egg-info

# The runs folder is ./runs under the working directory (/app) unless TLDR_RUNS says otherwise:
# make it writable for the app user (summaries, Ray temp files, the default sqlite store).
RUN groupadd --gid 1000 app \
    && useradd --uid 1000 --gid 1000 --create-home --shell /bin/bash app \
    && mkdir -p /app/runs && chown 1000:1000 /app/runs
USER 1000:1000

CMD ["python", "tune/search.py", "--help"]
