# syntax=docker/dockerfile:1
#
# The sagellm image. One Dockerfile, two builds (see docs/deployment.md):
#
#   head (api, beat, flower):  docker build -t sagellm .
#   GPU worker:                docker build -t sagellm-worker --build-arg ENGINES=vllm,embedding .
#
# ENGINES lists extras of pyproject.toml ("vllm", "embedding", "transformers"): only a
# worker spawns engines, so only its image carries vLLM, torch and CUDA wheels.
FROM python:3.11-slim

ARG ENGINES=""
# The user the processes run as. Engines write the Hugging Face cache bind-mounted
# from the host: build with --build-arg USER_UID=$(id -u) when the cache's owner is not 1000.
ARG USER_UID=1000
ARG USER_GID=1000

ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    SAGELLM_DATA_DIR=/data \
    HF_HOME=/home/sagellm/.cache/huggingface

# vLLM's Triton kernels are compiled when a model first loads: the worker image needs a
# C compiler at run time (not a leftover of the build; the head image has none).
RUN case ",$ENGINES," in \
      *,vllm,*) apt-get update \
        && apt-get install -y --no-install-recommends gcc libc6-dev \
        && rm -rf /var/lib/apt/lists/* ;; \
    esac

RUN groupadd --gid "$USER_GID" sagellm \
    && useradd --uid "$USER_UID" --gid "$USER_GID" --create-home --shell /usr/sbin/nologin sagellm \
    && mkdir -p /data "$HF_HOME" \
    && chown -R sagellm:sagellm /data /home/sagellm

WORKDIR /opt/sagellm
COPY pyproject.toml README.md ./
COPY app ./app
COPY workers ./workers
COPY presets ./presets
# Editable on purpose: app.core.presets finds the built-in presets next to the source
# tree (PRESETS_DIR = <checkout>/presets), which a plain `pip install .` into
# site-packages would leave behind. The source stays here, read-only, owned by root.
RUN pip install --no-cache-dir --editable "/opt/sagellm${ENGINES:+[$ENGINES]}" \
    && python -m compileall -q /opt/sagellm/app /opt/sagellm/workers

USER sagellm
VOLUME ["/data"]
# No HEALTHCHECK here: the same image runs beat, Flower and workers, which serve no
# /health; the api service in docker-compose.yml has one.
CMD ["sagellm", "--help"]
