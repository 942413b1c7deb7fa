"""The HTTP routes, one module per part of the API.

decisions   POST /decisions, POST /decisions/batch, GET /decisions/{id} (with ?include=applicant for audits)
audit       GET /decisions (search), DELETE /decisions/{id}/applicant (erasure)
monitoring  PUT /decisions/{id}/outcome, GET /monitoring
admin       /admin/*: the model registry, promotion, the challenger and its comparison
health      GET /model, /metrics, /openapi.json, /health/live, /health/ready
bodies      reading and decoding JSON bodies, answering JSON (shared by the above)
"""

from __future__ import annotations

from starlette.routing import Route

from service.routes import admin, audit, decisions, health, monitoring

ROUTES = [
    Route("/decisions", decisions.create_decision, methods=["POST"]),
    Route("/decisions", audit.search, methods=["GET"]),
    Route("/decisions/batch", decisions.create_batch, methods=["POST"]),
    Route("/decisions/{decision_id:uuid}", decisions.get_decision, methods=["GET"]),
    Route("/decisions/{decision_id:uuid}/outcome", monitoring.record_outcome, methods=["PUT"]),
    Route("/decisions/{decision_id:uuid}/applicant", audit.erase, methods=["DELETE"]),
    Route("/monitoring", monitoring.get_monitoring, methods=["GET"]),
    Route("/admin/models", admin.list_models, methods=["GET"]),
    Route("/admin/models/{version}/promote", admin.promote, methods=["POST"]),
    Route("/admin/challenger", admin.set_challenger, methods=["PUT"]),
    Route("/admin/challenger/comparison", admin.comparison, methods=["GET"]),
    Route("/admin/assignments", admin.history, methods=["GET"]),
    Route("/model", health.get_model, methods=["GET"]),
    Route("/health/live", health.live, methods=["GET"]),
    Route("/metrics", health.get_metrics, methods=["GET"]),
    Route("/openapi.json", health.get_openapi, methods=["GET"]),
    Route("/health/ready", health.ready, methods=["GET"]),
]
