# sa2va-rl on the official Ray image: one image for the Ray head, the GPU workers and the
# TensorBoard service of docker-compose.yml (see docs/cluster.md).
#
# The base is pinned to the Ray version setup.cfg pins (ray[default,rllib,tune]==2.60.0): the
# client that runs `ray job submit` and every node of the cluster must run the same Ray.
# "-gpu" is the image's CUDA build; "py311" its Python (3.11, like the project's CI).
FROM rayproject/ray:2.60.0-py311-gpu

# OpenCV's wheel needs libGL and glib; procps gives the worker healthcheck `pgrep`. The mount
# points of the shared volumes belong to the image's `ray` user (uid 1000, group users), so
# fresh named volumes are writable by it.
USER root
RUN apt-get update \
    && apt-get install -y --no-install-recommends libgl1 libglib2.0-0 procps \
    && rm -rf /var/lib/apt/lists/* \
    && mkdir -p /data /models /results /cache \
    && chown ray:users /results /cache
USER ray

# The project with the extras Sa2VA's remote code imports, plus TensorBoard to view the runs.
# Installed in place (-e), so the image runs the files copied here; orchestrator/tune_configs
# links to the copied tune_configs/ (a plain install would ship them inside the package).
WORKDIR /home/ray/sa2va-rl
COPY --chown=ray:users setup.cfg pyproject.toml README* ./
COPY --chown=ray:users orchestrator ./orchestrator
COPY --chown=ray:users envs ./envs
COPY --chown=ray:users models ./models
COPY --chown=ray:users tune_configs ./tune_configs
# torch and torchvision first, as one matched pair (PyPI's Linux builds are the CUDA ones the
# GPU image needs): the sa2va extra then never picks another torch for its torchvision.
RUN pip install --no-cache-dir "torch==2.13.0" "torchvision==0.28.0" \
    && pip install --no-cache-dir -e ".[sa2va]" "tensorboard>=2.16"

# Token authentication for every Ray process in this image (head, workers, job drivers, the
# `ray` CLI): Ray reads the token from RAY_AUTH_TOKEN_PATH, a file docker-compose.yml mounts
# as a secret. The token itself is never part of the image.
ENV PYTHONUNBUFFERED=1 \
    RAY_AUTH_MODE=token \
    RAY_AUTH_TOKEN_PATH=/run/secrets/ray_auth_token
