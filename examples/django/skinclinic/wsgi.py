"""WSGI entry point (``gunicorn skinclinic.wsgi``)."""

import os

from django.core.wsgi import get_wsgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "skinclinic.settings")
application = get_wsgi_application()
