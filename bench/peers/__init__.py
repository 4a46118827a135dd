"""The peers we measure ourselves against: small Celery apps written the way people write them."""
