"""The views: one call to ``dermal_fn.predict`` per upload, and the function's /health and /memory.

What a view needs from dermal-fn is three lines::

    import dermal_fn
    body = dermal_fn.predict(request.FILES["image"].read())      # the body of POST /predict
    warnings = dermal_fn.trust_sentences(body, language="vi")    # show them beside the labels
"""

from __future__ import annotations

from django.http import HttpRequest, HttpResponse, JsonResponse
from django.shortcuts import render
from django.views.decorators.http import require_GET, require_http_methods

import dermal_fn
from dermal_fn.errors import RequestError, ServiceUnavailable


def _language(request: HttpRequest) -> str:
    chosen = request.GET.get("lang") or request.POST.get("lang")
    if chosen in ("vi", "en"):
        return chosen
    accepted = request.headers.get("Accept-Language", "vi").lower()
    return "en" if accepted.startswith("en") else "vi"


@require_http_methods(["GET", "POST"])
def upload(request: HttpRequest) -> HttpResponse:
    """The upload form; on POST, the labels, the heatmap and the warnings for the photo."""
    language = _language(request)
    context: dict[str, object] = {"language": language}
    status = 200
    if request.method == "POST":
        photo = request.FILES.get("image")
        if photo is None:
            context["error"] = "Chưa chọn ảnh." if language == "vi" else "No photo was chosen."
            status = 400
        else:
            try:
                body = dermal_fn.predict(photo.read(), top_k=3)
            except RequestError as exc:  # the photo or an option: the client's mistake
                context["error"], status = str(exc), 400
            except ServiceUnavailable as exc:  # the model is loading or failed to load
                context["error"], status = str(exc), 503
            else:
                context["predictions"] = [
                    {"label": p["label"], "percent": round(100 * p["probability"], 1)}
                    for p in body["predictions"]
                ]
                context["heatmap"] = body["gradcam"].get("overlay_png")
                context["sentences"] = dermal_fn.trust_sentences(body, language=language)  # type: ignore[arg-type]
                context["model"] = body["model"]["name"]
    return render(request, "skinclinic/upload.html", context, status=status)


@require_GET
def health(request: HttpRequest) -> JsonResponse:
    """The function's /health: 503 once the model failed to load."""
    body = dermal_fn.health()
    return JsonResponse(body, status=503 if body["status"] == "error" else 200)


@require_GET
def memory(request: HttpRequest) -> JsonResponse:
    """The function's /memory: this process's RSS and what its container is charged for."""
    return JsonResponse(dermal_fn.memory())
