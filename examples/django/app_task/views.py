from django.http import JsonResponse

from .tasks import run_add


def _int_param(request, name, default):
    try:
        return int(request.GET.get(name, default))
    except (TypeError, ValueError):
        return None


def enqueue_add(request):
    """GET /enqueue/add/?x=1&y=2: send run_add(x, y) and return its task id."""
    x = _int_param(request, "x", 1)
    y = _int_param(request, "y", 2)
    if x is None or y is None:
        return JsonResponse({"error": "x and y must be integers"}, status=400)
    result = run_add.delay(x, y)
    return JsonResponse({"task_id": result.id})
