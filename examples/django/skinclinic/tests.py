"""The example, driven with Django's test client against the installed dermal-fn (no TensorFlow)."""

from __future__ import annotations

import io
import json
import sys

import numpy as np
from django.test import SimpleTestCase
from PIL import Image


def photo_bytes(seed: int = 5) -> bytes:
    """A JPEG of the demo model's own kind: a drawn round spot on synthetic skin (dermal_fn.demo.synth)."""
    from dermal_fn.demo import synth

    drawn = synth.generate(np.random.default_rng(seed), size=384, label=synth.ROUND_UNIFORM, hair=False)
    out = io.BytesIO()
    Image.fromarray(drawn.image).save(out, format="JPEG", quality=92)
    return out.getvalue()


class UploadTests(SimpleTestCase):
    def test_the_page_answers_with_labels_heatmap_and_warnings(self) -> None:
        from django.core.files.uploadedfile import SimpleUploadedFile

        upload = SimpleUploadedFile("photo.jpg", photo_bytes(), content_type="image/jpeg")
        response = self.client.post("/", {"image": upload, "lang": "en"})
        self.assertEqual(response.status_code, 200)
        text = response.content.decode()
        self.assertIn('class="predictions"', text)
        self.assertIn("data:image/png;base64,", text)
        self.assertIn('class="warnings"', text)
        self.assertIn('data-kind="fine"', text)  # a photo like the demo's own: nothing to warn about
        self.assertEqual(response.headers["X-Content-Type-Options"], "nosniff")

    def test_an_unlike_photo_is_flagged_in_vietnamese(self) -> None:
        from django.core.files.uploadedfile import SimpleUploadedFile

        rng = np.random.default_rng(1)
        noise = Image.fromarray(rng.integers(0, 256, (200, 200, 3), dtype=np.uint8))
        out = io.BytesIO()
        noise.save(out, format="PNG")
        upload = SimpleUploadedFile("noise.png", out.getvalue(), content_type="image/png")
        response = self.client.post("/", {"image": upload}, HTTP_ACCEPT_LANGUAGE="vi-VN,vi;q=0.9")
        self.assertEqual(response.status_code, 200)
        text = response.content.decode()
        self.assertIn('data-kind="distribution"', text)
        self.assertIn("không giống", text)

    def test_a_file_that_is_not_a_photo_is_a_400_with_the_reason(self) -> None:
        from django.core.files.uploadedfile import SimpleUploadedFile

        upload = SimpleUploadedFile("notes.jpg", b"not a photo at all", content_type="image/jpeg")
        response = self.client.post("/", {"image": upload, "lang": "en"})
        self.assertEqual(response.status_code, 400)
        self.assertIn('role="alert"', response.content.decode())

    def test_health_and_memory_have_the_functions_shapes(self) -> None:
        health = self.client.get("/health/")
        self.assertIn(health.status_code, (200, 503))
        self.assertTrue({"status", "model_loaded", "model_state", "gradcam_enabled"} <= set(health.json()))
        memory = self.client.get("/memory/").json()
        self.assertEqual(set(memory), {"status", "memory", "model_loaded", "gradcam_enabled"})
        self.assertTrue({"rss_mb", "usage_mb", "percent", "limit_mb"} <= set(memory["memory"]))
        json.dumps(memory)
        self.assertNotIn("tensorflow", sys.modules)  # the serving path: no TensorFlow
