"""Credit-scoring microservice: a Starlette app that scores, records and caches credit decisions."""
