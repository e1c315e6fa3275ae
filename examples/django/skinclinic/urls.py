"""The example's routes: the upload page, and /health/ and /memory/ with the function's shapes."""

from django.urls import path

from skinclinic import views

urlpatterns = [
    path("", views.upload, name="upload"),
    path("health/", views.health, name="health"),
    path("memory/", views.memory, name="memory"),
]
