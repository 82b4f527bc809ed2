"""Fixtures of the human evaluation tests: studies exported from small evaluation outputs, of two and of three
systems, and `human_client`, a TestClient of the annotation app that fills in the forms' CSRF tokens as a browser
does."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Callable, Optional

import pytest
from fastapi.testclient import TestClient

from eval.human.export import export_study
from helpers import write_eval_examples

FORM_CSRF = r'<form method="post" action="{action}">\s*<input type="hidden" name="csrf" value="([^"]*)">'


@pytest.fixture
def two_system_study(tmp_path: Path) -> Path:
    eval_dir = write_eval_examples(tmp_path / "eval", 8, ["base_model", "ppo_model"])
    return export_study(eval_dir, tmp_path / "human", n=5, seed=3)


@pytest.fixture
def three_system_study(tmp_path: Path) -> Path:
    eval_dir = write_eval_examples(tmp_path / "eval3", 6, ["base_model", "sft_model", "ppo_model"])
    return export_study(eval_dir, tmp_path / "human3", n=6, seed=1)


class Clock:
    """A clock the test moves by hand (epoch seconds)."""

    def __init__(self, now: float = 1_700_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


class HumanClient(TestClient):
    """The app as one browser: its own cookies; `sign_in` and `submit` send the CSRF token of the page, as the
    hidden form field does. `post` sends exactly what it is given."""

    csrf: Optional[str] = None  # the session's token, read from a page after sign-in

    def form_csrf(self, path: str, action: str = "/signout") -> str:
        """The CSRF token in the form posting to `action` on the page at `path` (after redirects)."""
        page = self.get(path, follow_redirects=True)
        found = re.search(FORM_CSRF.format(action=re.escape(action)), page.text)
        assert found, f"no CSRF field in the {action} form of {path}: {page.text[:800]}"
        return found.group(1)

    def try_sign_in(self, name: str, token: Optional[str] = None, code: Optional[str] = None) -> Any:
        data = {"csrf": self.form_csrf("/signin", "/signin"), "name": name}
        data |= ({"token": token} if token else {}) | ({"code": code} if code else {})
        response = self.post("/signin", data=data)
        if response.status_code == 303:
            self.csrf = self.form_csrf("/next")  # the sign-out form of any signed-in page carries it
        return response

    def sign_in(self, name: str, token: Optional[str] = None, code: Optional[str] = None) -> None:
        response = self.try_sign_in(name, token, code)
        assert response.status_code == 303 and response.headers["location"] == "/next", response.text[-800:]

    def submit(self, path: str, data: dict[str, Any]) -> Any:
        return self.post(path, data={"csrf": self.csrf, **data})


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def human_client() -> Callable[..., HumanClient]:
    """human_client(study_dir, db, token=None, clock=None, store_class=AnswerStore): a HumanClient of the app on
    `study_dir`, answers in `db`."""
    from eval.human.app import create_app
    from eval.human.items import load_study
    from eval.human.store import AnswerStore

    def make(study_dir: Path, db: Path, token: Optional[str] = None, clock: Optional[Clock] = None,
             store_class: type = AnswerStore) -> HumanClient:
        study = load_study(study_dir)
        app = create_app(study, store_class(db, study.items_sha256), token, **({"clock": clock} if clock else {}))
        return HumanClient(app, follow_redirects=False)

    return make
