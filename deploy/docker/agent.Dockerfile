# fedpriv site agent: checks the site's data, then runs a Flower SuperNode from the site's kit.
#
#   docker build -f deploy/docker/agent.Dockerfile -t fedpriv-agent .     (from the repository root)
#   docker run --rm -v $PWD/kits/sites/NAME:/kit:ro -v /srv/NAME/data.csv:/data/site.csv:ro \
#              -v /var/lib/fedpriv/NAME:/state --user "$(id -u):$(id -g)" fedpriv-agent
#
# /kit   the site's kit (read-only; its keys are 0600, so run as the user who owns them)
# /data  the site's data; it never leaves the container
# /state the site's privacy ledger and Flower state: back it up, it is the site's budget

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

# CPU torch first: the default wheel would pull CUDA libraries the site may not have.
RUN pip install "torch==${TORCH_VERSION}" --index-url https://download.pytorch.org/whl/cpu

# fedpriv as an installed package; no source tree stays in the image.
COPY --from=build /wheels /tmp/wheels
RUN pip install /tmp/wheels/fedpriv-*.whl && rm -rf /tmp/wheels && fedpriv --help >/dev/null

RUN useradd --uid 10001 --home-dir /state --no-create-home fedpriv \
    && mkdir -p /state && chown 10001:10001 /state && chmod 0700 /state
USER 10001
VOLUME ["/state"]
STOPSIGNAL SIGTERM
ENTRYPOINT ["fedpriv", "agent", "start", "--kit", "/kit", "--state", "/state"]
CMD ["--data", "/data/site.csv"]
