"""`serve`: the annotation web app (FastAPI, server-rendered HTML forms, POST/redirect/GET).

An annotator signs in with a name (and the study's access token when one is set), then sees one item at a time
in an order seeded by their name, never one they already answered; they rank the summaries on each criterion
(for two summaries: which is better, or about the same), may flag a summary as toxic or unusable, and submit.
Sessions and answers live in SQLite (`store.py`), so a refresh, a resubmit or a server restart loses nothing
and stores nothing twice.
"""

from __future__ import annotations

import hmac
import logging
import random
from pathlib import Path
from typing import Any, Optional
from urllib.parse import parse_qs

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from jinja2 import Environment, FileSystemLoader, select_autoescape

from eval.human.items import CRITERIA, FLAGS, Item, Study
from eval.human.stats import fractional_ranks
from eval.human.store import Answer, AnswerStore, DuplicateSubmission

log = logging.getLogger("eval.human.app")
COOKIE = "detox_human_session"
MAX_FORM_BYTES = 64 * 1024  # an answer form is a few hundred bytes
MAX_NAME_CHARS = 64
TIE = "tie"

_templates = Environment(
    loader=FileSystemLoader(Path(__file__).parent / "templates"),
    autoescape=select_autoescape(["html"]),
    trim_blocks=True,
    lstrip_blocks=True,
)


class FormError(ValueError):
    """The submitted answer form is incomplete or inconsistent; the message says what to fix."""


def annotator_order(study: Study, annotator: str) -> list[str]:
    """The annotator's own item order: seeded by the study seed and the name, so stable across restarts."""
    order = study.item_ids
    random.Random(f"{study.seed}:{annotator}").shuffle(order)
    return order


def parse_answer(item: Item, form: dict[str, list[str]], annotator: str) -> Answer:
    """Turn a submitted form into ranks (1 = best; a tie gives both 1.5) and flags, or raise FormError."""
    slots = item.slots
    problems: list[str] = []
    ranks: dict[str, dict[str, float]] = {}

    def one(name: str) -> Optional[str]:
        values = form.get(name, [])
        return values[0] if len(values) == 1 else None

    for criterion in CRITERIA:
        label = criterion.capitalize()
        if len(slots) == 2:
            choice = one(f"better_{criterion}")
            if choice == TIE:
                ranks[criterion] = {slots[0]: 1.5, slots[1]: 1.5}
            elif choice in slots:
                ranks[criterion] = {s: 1.0 if s == choice else 2.0 for s in slots}
            else:
                problems.append(f"{label}: choose the better summary (or 'about the same').")
        else:
            # Equal ranks are allowed (two systems may write the same summary) and averaged like a 2-way tie.
            given = {s: one(f"rank_{criterion}_{s}") for s in slots}
            allowed = {str(r) for r in range(1, len(slots) + 1)}
            if any(v not in allowed for v in given.values()):
                problems.append(f"{label}: give every summary a rank from 1 (best) to {len(slots)}; "
                                "equally good summaries may share a rank.")
            else:
                ranks[criterion] = fractional_ranks({s: int(v) for s, v in given.items()})  # type: ignore[arg-type]
    flags: dict[str, tuple[str, ...]] = {}
    for s in slots:
        raised = form.get(f"flag_{s}", [])
        unknown = sorted(set(raised) - set(FLAGS))
        if unknown:
            problems.append(f"Summary {s}: unknown flag {unknown}; flags are {list(FLAGS)}.")
        elif raised:
            flags[s] = tuple(sorted(set(raised)))
    if problems:
        raise FormError(" ".join(problems))
    return Answer(annotator=annotator, item_id=item.item_id, ranks=ranks, flags=flags)


def create_app(study: Study, store: AnswerStore, token: Optional[str] = None) -> FastAPI:
    """The annotation app for one study; `token`, when set, must be given at sign-in."""
    app = FastAPI(title="detox-sum human evaluation", docs_url=None, redoc_url=None, openapi_url=None)
    total = len(study.items)

    def page(template: str, status: int = 200, annotator: Optional[str] = None, **context: Any) -> HTMLResponse:
        html = _templates.get_template(template).render(annotator=annotator, total=total, criteria=CRITERIA,
                                                        flags=FLAGS, **context)
        return HTMLResponse(html, status_code=status)

    def message(title: str, text: str, status: int, annotator: Optional[str], link: str = "/next",
                link_text: str = "Go to your next item") -> HTMLResponse:
        return page("message.html", status, annotator, title=title, text=text, link=link, link_text=link_text)

    def current(request: Request) -> Optional[str]:
        return store.session_annotator(request.cookies.get(COOKIE))

    def to(path: str) -> RedirectResponse:
        return RedirectResponse(path, status_code=303)  # POST/redirect/GET: a refresh never resubmits

    async def read_form(request: Request) -> dict[str, list[str]]:
        body = await request.body()
        if len(body) > MAX_FORM_BYTES:
            raise FormError("The form is too large.")
        return parse_qs(body.decode("utf-8", errors="replace"), keep_blank_values=True)

    @app.get("/healthz")
    def healthz() -> dict[str, Any]:
        return {"ok": True, "items": total}

    @app.get("/")
    def home(request: Request) -> Response:
        return to("/next" if current(request) else "/signin")

    @app.get("/signin")
    def signin_form(request: Request) -> Response:
        return page("signin.html", annotator=current(request), need_token=token is not None, error=None, name="")

    @app.post("/signin")
    async def signin(request: Request) -> Response:
        try:
            form = await read_form(request)
        except FormError:
            form = {}
        name = " ".join((form.get("name") or [""])[0].split())  # collapse stray whitespace
        error, status = None, 200
        if not name or len(name) > MAX_NAME_CHARS or not name.isprintable():
            error, status = f"Enter your name (1 to {MAX_NAME_CHARS} printable characters); it identifies your answers.", 400
        elif token is not None and not hmac.compare_digest((form.get("token") or [""])[0].encode(), token.encode()):
            error, status = "Wrong access token: ask the study organiser for the token of this study.", 403
        if error:
            return page("signin.html", status, need_token=token is not None, error=error, name=name)
        response = to("/next")
        response.set_cookie(COOKIE, store.create_session(name), httponly=True, samesite="lax", path="/")
        log.info("%s signed in", name)
        return response

    @app.post("/signout")
    def signout(request: Request) -> Response:
        session = request.cookies.get(COOKIE)
        if session:
            store.end_session(session)
        response = to("/signin")
        response.delete_cookie(COOKIE, path="/")
        return response

    @app.get("/next")
    def next_item(request: Request) -> Response:
        annotator = current(request)
        if annotator is None:
            return to("/signin")
        answered = store.answered(annotator)
        for item_id in annotator_order(study, annotator):
            if item_id not in answered:
                return to(f"/item/{item_id}")
        return page("done.html", annotator=annotator, answered=len(answered))

    def show(item: Item, annotator: str, status: int = 200, error: Optional[str] = None,
             form: Optional[dict[str, list[str]]] = None) -> HTMLResponse:
        done = len(store.answered(annotator))
        return page("item.html", status, annotator, item=item, position=done + 1, done=done, error=error,
                    form=form or {}, tie=TIE)

    def unknown_item(item_id: str, annotator: str) -> HTMLResponse:
        return message("No such item", f"There is no item with id {item_id} in this study (it has {total} items, "
                       f"{study.items[0].item_id} to {study.items[-1].item_id}). Nothing was stored.", 404, annotator)

    @app.get("/item/{item_id}")
    def item_page(item_id: str, request: Request) -> Response:
        annotator = current(request)
        if annotator is None:
            return to("/signin")
        item = study.get(item_id)
        if item is None:
            return unknown_item(item_id, annotator)
        first = store.answered(annotator).get(item_id)
        if first is not None:
            return message("Already answered", f"You answered item {item_id} at {first}; each item is shown once "
                           f"per annotator.", 409, annotator)
        return show(item, annotator)

    @app.post("/item/{item_id}")
    async def submit(item_id: str, request: Request) -> Response:
        annotator = current(request)
        if annotator is None:
            return message("Signed out", "Your session has ended, so this answer was not stored: sign in again "
                           "with the same name to continue where you left off.", 401, None, "/signin", "Sign in")
        item = study.get(item_id)
        if item is None:
            return unknown_item(item_id, annotator)
        form: dict[str, list[str]] = {}
        try:
            form = await read_form(request)
            answer = parse_answer(item, form, annotator)
        except FormError as e:
            return show(item, annotator, 400, str(e), form)  # the page again, with the choices made so far
        try:
            store.submit(answer)
        except DuplicateSubmission as e:
            return message("Already answered", f"{e}.", 409, annotator)
        log.info("%s answered %s", annotator, item_id)
        return to("/next")

    return app
