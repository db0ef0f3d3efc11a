from django.urls import path

from app_task import views

urlpatterns = [
    path("enqueue/add/", views.enqueue_add, name="enqueue-add"),
]
