FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml README.md ./
COPY mailer mailer
COPY workers workers
RUN pip install --no-cache-dir . flower
RUN useradd --create-home mailer
USER mailer
CMD ["mailer", "worker"]
