"""`serve`: the annotation web app (FastAPI, server-rendered HTML forms, POST/redirect/GET).

An annotator signs in with a name (and the study's access token when one is set), then sees one item at a time
in an order seeded by their name, never one they already answered; they rank the summaries on each criterion
(for two summaries: which is better, or about the same), may flag a summary as toxic or unusable, and submit.
Sessions and answers live in SQLite (`store.py`), so a refresh, a resubmit or a server restart loses nothing
and stores nothing twice.

Against a hostile visitor: a request whose body could exceed MAX_FORM_BYTES is refused from its headers, before
any of the body is read (RequestGuard); a POST sent by a page of another origin (another port counts: SameSite
cookies do not separate ports) is refused from its Origin or Referer header, and every form carries a CSRF token
(the sign-in form one signed for this browser's pre-session cookie, the others their session's); a name is one
annotator however it is capitalised, and belongs to whoever signed in under it first (their browser keeps the
personal code, which they can type in on another); sessions end after SESSION_IDLE_S without use and
SESSION_MAX_S after sign-in.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import random
import secrets
import time
from pathlib import Path
from typing import Any, Callable, Optional
from urllib.parse import parse_qs, urlsplit

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, PlainTextResponse, RedirectResponse, Response
from jinja2 import Environment, FileSystemLoader, select_autoescape
from starlette.datastructures import Headers
from starlette.types import ASGIApp, Receive, Scope, Send

from eval.human.items import CRITERIA, FLAGS, Item, Study
from eval.human.stats import fractional_ranks
from eval.human.store import (Answer, AnswerStore, DuplicateSubmission, NameTaken, Session, clean_code, clean_name,
                              format_code)

log = logging.getLogger("eval.human.app")
COOKIE = "detox_human_session"
SIGNIN_COOKIE = "detox_human_signin"  # pre-session: the sign-in form's CSRF token is signed for it
CODES_COOKIE = "detox_human_codes"  # the personal codes of the annotators who signed in on this browser
CSRF_FIELD = "csrf"
MAX_FORM_BYTES = 64 * 1024  # an answer form is a few hundred bytes
MAX_NAME_CHARS = 64
MAX_CODES_PER_BROWSER = 8
CODES_COOKIE_MAX_AGE_S = 365 * 24 * 3600
SESSION_IDLE_S = 12 * 3600  # a session unused this long has ended
SESSION_MAX_S = 7 * 24 * 3600  # and any session ends this long after its sign-in
TOUCH_EVERY_S = 60  # how stale a session's last use may be stored, to spare a write per page
TIE = "tie"
DEFAULT_PORTS = {"http": 80, "https": 443}

_templates = Environment(
    loader=FileSystemLoader(Path(__file__).parent / "templates"),
    autoescape=select_autoescape(["html"]),
    trim_blocks=True,
    lstrip_blocks=True,
)


class FormError(ValueError):
    """The submitted answer form is incomplete or inconsistent; the message says what to fix."""


def _origin(url: str) -> Optional[tuple[str, str, int]]:
    """(scheme, host, port) of an http(s) URL, or None when it is not one (including the Origin "null")."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        return None
    if parts.scheme not in DEFAULT_PORTS or not parts.hostname:
        return None
    return parts.scheme, parts.hostname.lower(), port or DEFAULT_PORTS[parts.scheme]


def foreign_origin(scope: Scope, headers: Headers) -> Optional[str]:
    """Why a state-changing request must be refused as sent by another site, or None. Browsers send Origin with
    every POST (Referer when an old one does not); a request with neither is no browser's, and still needs the
    form's CSRF token."""
    sent = headers.get("origin") or headers.get("referer")
    if sent is None:
        return None
    own = f"{scope.get('scheme', 'http')}://{headers.get('host', '')}"
    if _origin(sent) is not None and _origin(sent) == _origin(own):
        return None
    shown = sent if len(sent) <= 100 else sent[:100] + "…"
    return (f"this form was sent from {shown!r}, not from this site ({own}): open the study at {own}/ "
            f"and try again")


def body_problem(headers: Headers, limit: int) -> Optional[tuple[int, str]]:
    """(status, reason) when the request body is refused from its headers alone, or None."""
    if "transfer-encoding" in headers:
        return 411, "a request body must come with a Content-Length (chunked bodies are not accepted)"
    length = headers.get("content-length")
    if length is None:
        return None  # no body
    if not (length.isascii() and length.isdigit()) or len(length) > 20:  # int() would take "²" or "1_0"
        return 400, f"Content-Length must be a number of bytes, got {length[:40]!r}"
    if int(length) > limit:
        return 413, f"the request body is too large ({int(length)} bytes; at most {limit})"
    return None


class RequestGuard:
    """Refuses, from the headers alone and before routing, a request with a body that could exceed `max_body`
    (so the server never reads or buffers it) and a POST from another origin. Answers one plain-text line and
    closes the connection, so the unread body is never drained either."""

    def __init__(self, app: ASGIApp, max_body: int) -> None:
        self.app, self.max_body = app, max_body

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            headers = Headers(scope=scope)
            problem = body_problem(headers, self.max_body)
            if problem is None and scope["method"] not in ("GET", "HEAD", "OPTIONS"):
                reason = foreign_origin(scope, headers)
                problem = None if reason is None else (403, reason)
            if problem is not None:
                status, reason = problem
                log.warning("refused %s %s: %s", scope["method"], scope.get("path"), reason)
                response = PlainTextResponse(f"{status}: {reason}\n", status, headers={"connection": "close"})
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


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


def create_app(study: Study, store: AnswerStore, token: Optional[str] = None, *,
               clock: Callable[[], float] = time.time) -> FastAPI:
    """The annotation app for one study; `token`, when set, must be given at sign-in. `clock`: for tests."""
    app = FastAPI(title="detox-sum human evaluation", docs_url=None, redoc_url=None, openapi_url=None)
    app.add_middleware(RequestGuard, max_body=MAX_FORM_BYTES)
    total = len(study.items)

    def page(template: str, status: int = 200, session: Optional[Session] = None, code: Optional[str] = None,
             **context: Any) -> HTMLResponse:
        html = _templates.get_template(template).render(
            annotator=session.annotator if session else None, csrf=session.csrf if session else "",
            code=format_code(code) if code else None, total=total, criteria=CRITERIA, flags=FLAGS, **context)
        return HTMLResponse(html, status_code=status)

    def message(title: str, text: str, status: int, session: Optional[Session], link: str = "/next",
                link_text: str = "Go to your next item") -> HTMLResponse:
        return page("message.html", status, session, title=title, text=text, link=link, link_text=link_text)

    def secure(request: Request) -> bool:
        return request.url.scheme == "https"

    def browser_codes(request: Request) -> list[str]:
        return (request.cookies.get(CODES_COOKIE) or "").split(".")[:MAX_CODES_PER_BROWSER]

    def own_code(request: Request, session: Session) -> Optional[str]:
        """The signed-in annotator's personal code, when this browser keeps it: shown so it can be used elsewhere."""
        return store.code_among(session.annotator, browser_codes(request))

    def current(request: Request) -> tuple[Optional[Session], bool]:
        """(the live session of this browser or None, whether it had one that expired)."""
        cookie = request.cookies.get(COOKIE)
        session = store.session(cookie)
        if cookie is None or session is None:
            return None, False
        now = clock()
        if now - session.last_seen > SESSION_IDLE_S or now - session.created > SESSION_MAX_S:
            store.end_session(cookie)
            return None, True
        if now - session.last_seen > TOUCH_EVERY_S:
            store.touch_session(cookie, now)
        return session, False

    def signed_out(expired: bool) -> RedirectResponse:
        response = to("/signin?expired=1" if expired else "/signin")
        response.delete_cookie(COOKIE, path="/")
        return response

    def to(path: str) -> RedirectResponse:
        return RedirectResponse(path, status_code=303)  # POST/redirect/GET: a refresh never resubmits

    async def read_form(request: Request) -> dict[str, list[str]]:
        # RequestGuard refused any Content-Length over the limit; the bound here holds whatever the framing.
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > MAX_FORM_BYTES:
                raise FormError("The form is too large.")
        return parse_qs(body.decode("utf-8", errors="replace"), keep_blank_values=True)

    def csrf_ok(form: dict[str, list[str]], expected: Optional[str]) -> bool:
        given = form.get(CSRF_FIELD, [])
        return (expected is not None and len(given) == 1
                and hmac.compare_digest(given[0].encode(), expected.encode()))

    def signin_csrf(presession: Optional[str]) -> Optional[str]:
        # Signed with the store's secret: a cookie planted from another port cannot come with a token that fits.
        if not presession:
            return None
        return hmac.new(store.form_secret, f"signin:{presession}".encode(), hashlib.sha256).hexdigest()

    def signin_page(request: Request, status: int = 200, error: Optional[str] = None, name: str = "",
                    notice: Optional[str] = None) -> HTMLResponse:
        presession = request.cookies.get(SIGNIN_COOKIE) or ""
        fresh = len(presession) != 43  # token_urlsafe(32); anything else was not set by this app
        if fresh:
            presession = secrets.token_urlsafe(32)
        response = page("signin.html", status, current(request)[0], need_token=token is not None, error=error,
                        notice=notice, name=name, signin_csrf=signin_csrf(presession))
        if fresh:
            response.set_cookie(SIGNIN_COOKIE, presession, httponly=True, samesite="lax", path="/",
                                secure=secure(request))
        return response

    @app.get("/healthz")
    def healthz() -> dict[str, Any]:
        return {"ok": True, "items": total}

    @app.get("/")
    def home(request: Request) -> Response:
        session, expired = current(request)
        return to("/next") if session else signed_out(expired)

    @app.get("/signin")
    def signin_form(request: Request, expired: Optional[str] = None) -> Response:
        notice = None
        if expired is not None:
            notice = (f"Your session has ended ({SESSION_IDLE_S // 3600} hours without activity, or "
                      f"{SESSION_MAX_S // 86400} days after signing in): sign in again to continue where you left off.")
        return signin_page(request, notice=notice)

    @app.post("/signin")
    async def signin(request: Request) -> Response:
        try:
            form = await read_form(request)
        except FormError:
            form = {}
        name = clean_name((form.get("name") or [""])[0])
        if not csrf_ok(form, signin_csrf(request.cookies.get(SIGNIN_COOKIE))):
            return signin_page(request, 403, "This sign-in form was out of date or sent from another site, so "
                               "nothing happened: sign in again.", name)
        error, status = None, 200
        if not name or len(name) > MAX_NAME_CHARS or not name.isprintable():
            error, status = f"Enter your name (1 to {MAX_NAME_CHARS} printable characters); it identifies your answers.", 400
        elif token is not None and not hmac.compare_digest((form.get("token") or [""])[0].encode(), token.encode()):
            error, status = "Wrong access token: ask the study organiser for the token of this study.", 403
        if error:
            return signin_page(request, status, error, name)
        codes = browser_codes(request)
        try:
            name, code = store.sign_in(name, [*(form.get("code") or [""])[:1], *codes])
        except NameTaken as e:
            return signin_page(request, 403, f"The name {e.display_name!r} belongs to an annotator who signed in "
                               "on another browser. If that is you, type in the personal code shown on your pages "
                               "there; otherwise choose another name.", name)
        old = request.cookies.get(COOKIE)
        if old:
            store.end_session(old)  # a sign-in always starts a new session, never adopts an existing one
        now = clock()
        store.forget_sessions(idle_before=now - SESSION_IDLE_S, created_before=now - SESSION_MAX_S)
        session_token, _ = store.create_session(name, now)
        response = to("/next")
        response.set_cookie(COOKIE, session_token, max_age=SESSION_MAX_S, httponly=True, samesite="lax", path="/",
                            secure=secure(request))
        kept = [code, *(c for c in map(clean_code, codes) if c and c != code)][:MAX_CODES_PER_BROWSER]
        response.set_cookie(CODES_COOKIE, ".".join(kept), max_age=CODES_COOKIE_MAX_AGE_S, httponly=True,
                            samesite="lax", path="/", secure=secure(request))
        response.delete_cookie(SIGNIN_COOKIE, path="/")
        log.info("%s signed in", name)
        return response

    @app.post("/signout")
    async def signout(request: Request) -> Response:
        session, _ = current(request)
        if session is not None:
            try:
                form = await read_form(request)
            except FormError:
                form = {}
            if not csrf_ok(form, session.csrf):
                return message("Not signed out", "This sign-out form was out of date or sent from another site: "
                               "use the Sign out button of a page of this study.", 403, session)
            store.end_session(request.cookies[COOKIE])
        return signed_out(False)

    @app.get("/next")
    def next_item(request: Request) -> Response:
        session, expired = current(request)
        if session is None:
            return signed_out(expired)
        answered = store.answered(session.annotator)
        for item_id in annotator_order(study, session.annotator):
            if item_id not in answered:
                return to(f"/item/{item_id}")
        return page("done.html", 200, session, own_code(request, session), answered=len(answered))

    def show(request: Request, item: Item, session: Session, status: int = 200, error: Optional[str] = None,
             form: Optional[dict[str, list[str]]] = None) -> HTMLResponse:
        done = len(store.answered(session.annotator))
        return page("item.html", status, session, own_code(request, session), item=item, position=done + 1,
                    done=done, error=error, form=form or {}, tie=TIE)

    def unknown_item(item_id: str, session: Session) -> HTMLResponse:
        return message("No such item", f"There is no item with id {item_id} in this study (it has {total} items, "
                       f"{study.items[0].item_id} to {study.items[-1].item_id}). Nothing was stored.", 404, session)

    @app.get("/item/{item_id}")
    def item_page(item_id: str, request: Request) -> Response:
        session, expired = current(request)
        if session is None:
            return signed_out(expired)
        item = study.get(item_id)
        if item is None:
            return unknown_item(item_id, session)
        first = store.answered(session.annotator).get(item_id)
        if first is not None:
            return message("Already answered", f"You answered item {item_id} at {first}; each item is shown once "
                           f"per annotator.", 409, session)
        return show(request, item, session)

    @app.post("/item/{item_id}")
    async def submit(item_id: str, request: Request) -> Response:
        session, expired = current(request)
        if session is None:
            why = "has expired" if expired else "has ended"
            return message("Signed out", f"Your session {why}, so this answer was not stored: sign in again "
                           "with the same name to continue where you left off.", 401, None, "/signin", "Sign in")
        item = study.get(item_id)
        if item is None:
            return unknown_item(item_id, session)
        form: dict[str, list[str]] = {}
        try:
            form = await read_form(request)
        except FormError as e:
            return show(request, item, session, 400, str(e))
        if not csrf_ok(form, session.csrf):
            return message("Not stored", "This answer form was out of date or sent from another site, so nothing "
                           "was stored: open the item again and submit it from there.", 403, session,
                           f"/item/{item_id}", "Open the item again")
        try:
            answer = parse_answer(item, form, session.annotator)
        except FormError as e:
            return show(request, item, session, 400, str(e), form)  # the page again, with the choices made so far
        try:
            store.submit(answer)
        except DuplicateSubmission as e:
            return message("Already answered", f"{e}.", 409, session)
        log.info("%s answered %s", session.annotator, item_id)
        return to("/next")

    return app
