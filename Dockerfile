# One image for every service of docker-compose.yml: worker, Flower, the dev sink, a producer.
FROM python:3.11-slim
ENV PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /app
COPY pyproject.toml README.md ./
COPY mailer mailer
COPY workers workers
COPY devkit devkit
# EXTRAS=devkit (the compose `dev` profile builds with it) adds the development sink.
ARG EXTRAS=""
RUN pip install ".${EXTRAS:+[$EXTRAS]}" "flower>=2.0,<3"
# Named volumes take their owner from these directories: Flower's state, the dev sink's CA.
RUN useradd --create-home --uid 10001 mailer && mkdir -p /data /tls && chown mailer:mailer /data /tls
USER mailer
# 9808: worker metrics (MAILER_METRICS_PORT), 5555: Flower.
EXPOSE 9808 5555
# `mailer worker` execs Celery, so Celery is PID 1 and gets SIGTERM itself (warm shutdown).
STOPSIGNAL SIGTERM
CMD ["mailer", "worker"]
