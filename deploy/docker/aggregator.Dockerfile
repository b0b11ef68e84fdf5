# fedpriv aggregator: a Flower SuperLink with TLS and node authentication; runs are kept in the state volume.
#
#   docker build -f deploy/docker/aggregator.Dockerfile -t fedpriv-aggregator .   (from the repository root)
#   docker run -d --name fedpriv-aggregator -p 9092:9092 -v $PWD/kits/aggregator:/kit:ro \
#              -v /var/lib/fedpriv/aggregator:/state --user "$(id -u):$(id -g)" fedpriv-aggregator
#   docker exec fedpriv-aggregator fedpriv aggregator run --kit /kit --state /state --set rounds=20
#
# Only the Fleet API (9092) is published. The control API (submit runs,
# register sites) stays on the container's loopback: use it through `docker exec`.

# Build stage: the fedpriv wheel, from the package folders only.
FROM python:3.11-slim AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY common ./common
COPY client ./client
COPY server ./server
COPY simulation ./simulation
COPY audit ./audit
COPY fedpriv ./fedpriv
RUN pip install --no-cache-dir --disable-pip-version-check build \
    && python -m build --wheel --outdir /wheels .

FROM python:3.11-slim

ARG TORCH_VERSION=2.13.0
ENV PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    FLWR_TELEMETRY_ENABLED=0 \
    HF_HUB_OFFLINE=1 \
    HOME=/state \
    FEDPRIV_CACHE_DIR=/state/cache

RUN pip install "torch==${TORCH_VERSION}" --index-url https://download.pytorch.org/whl/cpu

# fedpriv as an installed package; no source tree stays in the image: the
# Flower App folder a run is submitted with is written by the installed fedpriv.
COPY --from=build /wheels /tmp/wheels
RUN pip install /tmp/wheels/fedpriv-*.whl && rm -rf /tmp/wheels && fedpriv --help >/dev/null

RUN useradd --uid 10001 --home-dir /state --no-create-home fedpriv \
    && mkdir -p /state && chown 10001:10001 /state && chmod 0700 /state
USER 10001
VOLUME ["/state"]
EXPOSE 9092
STOPSIGNAL SIGTERM
ENTRYPOINT ["fedpriv", "aggregator", "start", "--kit", "/kit", "--state", "/state"]
CMD ["--fleet-listen", "0.0.0.0:9092", "--control-listen", "127.0.0.1:9093"]
