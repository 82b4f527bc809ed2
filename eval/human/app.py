"""`serve`: the annotation web app (FastAPI, server-rendered HTML forms, POST/redirect/GET).

An annotator signs in with a name (and the study's access token when one is set), then sees one item at a time
in an order seeded by their name, never one they already answered; they rank the summaries on each criterion
(for two summaries: which is better, or about the same), may flag a summary as toxic or unusable, and submit.
Sessions and answers live in SQLite (`store.py`), so a refresh, a resubmit or a server restart loses nothing
and stores nothing twice.

Against a hostile visitor: a request whose body could exceed MAX_FORM_BYTES is refused from its headers, before
any of the body is read (RequestGuard); a POST sent by a page of another origin (another port counts: SameSite
cookies do not separate ports) is refused from its Origin or Referer header, compared with the request's Host;
every form carries a CSRF token (the sign-in form a single-use, expiring one the server issued with a pre-session
cookie, see SigninForms; the others their session's). A name is one annotator however it is capitalised or
written (NFKC), may not hold invisible characters or mix scripts, and belongs to whoever signed in under it first:
a browser keeps the personal code of the annotator signed in on it until they sign out, and anyone else must
type the code. Sessions end after SESSION_IDLE_S without use and SESSION_MAX_S after sign-in; no page is cached.
Handlers that touch the database run in FastAPI's threadpool, never on the event loop.
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
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import HTMLResponse, PlainTextResponse, RedirectResponse, Response
from jinja2 import Environment, FileSystemLoader, select_autoescape
from starlette.datastructures import Headers
from starlette.types import ASGIApp, Receive, Scope, Send

from eval.human.items import CRITERIA, FLAGS, Item, Study
from eval.human.stats import fractional_ranks
from eval.human.store import (Answer, AnswerStore, DuplicateSubmission, NameTaken, Session, clean_name, format_code,
                              name_problem)
from rewards.http_limits import BodyRefused, ClientGone, content_length, read_bounded

log = logging.getLogger("eval.human.app")
COOKIE = "detox_human_session"
SIGNIN_COOKIE = "detox_human_signin"  # pre-session: names the sign-in form the server issued (SigninForms)
CODE_COOKIE = "detox_human_code"  # the personal code of the annotator signed in on this browser
FORMER_CODES_COOKIE = "detox_human_codes"  # an earlier version kept every code signed in here: deleted when seen
CSRF_FIELD = "csrf"
MAX_FORM_BYTES = 64 * 1024  # an answer form is a few hundred bytes
FORM_DEADLINE_S = 30.0  # a form still arriving after this is refused: a stalled upload holds a connection
SIGNIN_FORM_TTL_S = 3600  # how long a sign-in form may stay open before it is out of date
CODE_COOKIE_MAX_AGE_S = 365 * 24 * 3600
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
    try:
        content_length(headers, limit, chunked=False)  # a form always comes with its length
    except BodyRefused as e:
        return e.status, e.message
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


def to(path: str) -> RedirectResponse:
    return RedirectResponse(path, status_code=303)  # POST/redirect/GET: a refresh never resubmits


def signed_out(expired: bool) -> RedirectResponse:
    response = to("/signin?expired=1" if expired else "/signin")
    response.delete_cookie(COOKIE, path="/")
    return response


def secure(request: Request) -> bool:
    return request.url.scheme == "https"


def csrf_ok(form: dict[str, list[str]], expected: Optional[str]) -> bool:
    given = form.get(CSRF_FIELD, [])
    return (expected is not None and len(given) == 1
            and hmac.compare_digest(given[0].encode(), expected.encode()))


async def read_form(request: Request) -> dict[str, list[str]]:
    # RequestGuard refused the headers of a body over the limit; reading stops at the declared length whatever
    # arrives, and at FORM_DEADLINE_S.
    try:
        size = content_length(request.headers, MAX_FORM_BYTES, chunked=False)
        body = await read_bounded(request, size, FORM_DEADLINE_S, exact=True)
    except ClientGone as e:
        log.warning("%s %s: %s", request.method, request.url.path, e.message)
        raise FormError("The connection closed before the form arrived.") from None
    except BodyRefused as e:
        raise FormError("The form is too large." if e.status == 413 else f"The form was refused: {e.message}.") from None
    return parse_qs(body.decode("utf-8", errors="replace"), keep_blank_values=True)


class SigninForms:
    """The sign-in form's CSRF pair, issued by the server: a pre-session cookie "<issued>.<nonce>.<mac>" and the
    form's token, an HMAC of the same issued time and nonce. The cookie's MAC shows this server issued it, so a
    value a caller picks gets no token; a pair signs in once (its nonce is recorded when used) and only within
    SIGNIN_FORM_TTL_S of being issued.

    What this adds to RequestGuard's Origin/Referer check: a browser that sends neither header (an old one, or a
    page that suppresses its Referer) still cannot submit a sign-in form made by another site, which can neither
    read this cookie nor get a token for it. A site that can write this host's cookies (a page on another port of
    it) could plant a fresh pair it fetched itself; only the Origin/Referer check refuses its form."""

    def __init__(self, store: AnswerStore, clock: Callable[[], float]) -> None:
        self.store, self.clock = store, clock

    def _mac(self, purpose: str, issued_nonce: str) -> str:
        return hmac.new(self.store.form_secret, f"{purpose}:{issued_nonce}".encode(), hashlib.sha256).hexdigest()

    def issue(self) -> str:
        issued_nonce = f"{int(self.clock())}.{secrets.token_urlsafe(32)}"
        return f"{issued_nonce}.{self._mac('signin-cookie', issued_nonce)}"

    def _valid(self, cookie: Optional[str], max_age_s: float = SIGNIN_FORM_TTL_S) -> Optional[tuple[str, str]]:
        """(issued.nonce, nonce) of a cookie this server issued less than `max_age_s` ago, else None."""
        parts = (cookie or "").split(".")
        if len(parts) != 3 or not (parts[0].isascii() and parts[0].isdigit() and len(parts[0]) < 16):
            return None
        issued, nonce, mac = parts
        if not hmac.compare_digest(mac.encode(), self._mac("signin-cookie", f"{issued}.{nonce}").encode()):
            return None
        age = self.clock() - int(issued)
        return (f"{issued}.{nonce}", nonce) if -60 <= age < max_age_s else None

    def token(self, cookie: str) -> str:
        """The token the form of `cookie` (one issue() returned) carries."""
        valid = self._valid(cookie)
        assert valid is not None, "a cookie this server just issued"
        return self._mac("signin-form", valid[0])

    def reusable(self, cookie: Optional[str]) -> bool:
        """Whether a sign-in page may keep the browser's cookie, so that two open sign-in tabs both work: unused,
        and with half its lifetime left for the form to be filled in."""
        valid = self._valid(cookie, SIGNIN_FORM_TTL_S / 2)
        return valid is not None and not self.store.signin_nonce_used(valid[1])

    def use(self, cookie: Optional[str], form: dict[str, list[str]]) -> bool:
        """Whether `form` may sign in: it carries the token of this browser's cookie, which is unexpired and
        unused; it is used from now on."""
        valid = self._valid(cookie)
        if valid is None or not csrf_ok(form, self._mac("signin-form", valid[0])):
            return False
        now = self.clock()
        return self.store.use_signin_nonce(valid[1], now, forget_before=now - SIGNIN_FORM_TTL_S)


class AnnotationPages:
    """The pages and form handlers of one study. Every method runs in FastAPI's threadpool (create_app registers
    them as plain functions, or hands them the form it read), because each store call blocks on SQLite."""

    def __init__(self, study: Study, store: AnswerStore, token: Optional[str], clock: Callable[[], float]) -> None:
        self.study, self.store, self.token, self.clock = study, store, token, clock
        self.signin_forms = SigninForms(store, clock)

    # Rendering. No page is kept in the browser's cache: Back after signing out must not show a personal code.
    def page(self, template: str, status: int = 200, session: Optional[Session] = None, code: Optional[str] = None,
             **context: Any) -> HTMLResponse:
        html = _templates.get_template(template).render(
            annotator=session.annotator if session else None, csrf=session.csrf if session else "",
            code=format_code(code) if code else None, total=len(self.study.items), criteria=CRITERIA, flags=FLAGS,
            **context)
        return HTMLResponse(html, status_code=status, headers={"cache-control": "no-store"})

    def message(self, title: str, text: str, status: int, session: Optional[Session], link: str = "/next",
                link_text: str = "Go to your next item") -> HTMLResponse:
        return self.page("message.html", status, session, title=title, text=text, link=link, link_text=link_text)

    def signin_page(self, request: Request, status: int = 200, error: Optional[str] = None, name: str = "",
                    notice: Optional[str] = None, fresh: bool = False) -> HTMLResponse:
        """The sign-in form; `fresh`: with a new CSRF pair (after a POST, whose pair was used or refused)."""
        cookie = request.cookies.get(SIGNIN_COOKIE)
        issue = fresh or not self.signin_forms.reusable(cookie)
        if issue:
            cookie = self.signin_forms.issue()
        response = self.page("signin.html", status, self.current(request)[0], need_token=self.token is not None,
                             error=error, notice=notice, name=name, signin_csrf=self.signin_forms.token(cookie))
        if issue:
            response.set_cookie(SIGNIN_COOKIE, cookie, max_age=SIGNIN_FORM_TTL_S, httponly=True, samesite="lax",
                                path="/", secure=secure(request))
        return response

    def show(self, request: Request, item: Item, session: Session, status: int = 200, error: Optional[str] = None,
             form: Optional[dict[str, list[str]]] = None) -> HTMLResponse:
        done = len(self.store.answered(session.annotator))
        return self.page("item.html", status, session, self.own_code(request, session), item=item, position=done + 1,
                         done=done, error=error, form=form or {}, tie=TIE)

    def unknown_item(self, item_id: str, session: Session) -> HTMLResponse:
        items = self.study.items
        return self.message("No such item", f"There is no item with id {item_id} in this study (it has {len(items)} "
                            f"items, {items[0].item_id} to {items[-1].item_id}). Nothing was stored.", 404, session)

    # Sessions.
    def current(self, request: Request) -> tuple[Optional[Session], bool]:
        """(the live session of this browser or None, whether it had one that expired)."""
        cookie = request.cookies.get(COOKIE)
        session = self.store.session(cookie)
        if cookie is None or session is None:
            return None, False
        now = self.clock()
        if now - session.last_seen > SESSION_IDLE_S or now - session.created > SESSION_MAX_S:
            self.store.end_session(cookie)
            return None, True
        if now - session.last_seen > TOUCH_EVERY_S:
            self.store.touch_session(cookie, now)
        return session, False

    def own_code(self, request: Request, session: Session) -> Optional[str]:
        """The signed-in annotator's personal code, when this browser keeps it: shown so it can be used elsewhere."""
        return self.store.code_among(session.annotator, [request.cookies.get(CODE_COOKIE) or ""])

    # Routes.
    def healthz(self) -> dict[str, Any]:
        return {"ok": True, "items": len(self.study.items)}

    def home(self, request: Request) -> Response:
        session, expired = self.current(request)
        return to("/next") if session else signed_out(expired)

    def signin_form(self, request: Request, expired: Optional[str] = None) -> Response:
        notice = None
        if expired is not None:
            notice = (f"Your session has ended ({SESSION_IDLE_S // 3600} hours without activity, or "
                      f"{SESSION_MAX_S // 86400} days after signing in): sign in again to continue where you left off.")
        return self.signin_page(request, notice=notice)

    def signin(self, request: Request, form: dict[str, list[str]]) -> Response:
        name = clean_name((form.get("name") or [""])[0])
        if not self.signin_forms.use(request.cookies.get(SIGNIN_COOKIE), form):
            return self.signin_page(request, 403, "This sign-in form was out of date or sent from another site, so "
                                    "nothing happened: sign in again.", name, fresh=True)
        error, status = name_problem(name), 400
        if error is None and self.token is not None and not hmac.compare_digest(
                (form.get("token") or [""])[0].encode(), self.token.encode()):
            error, status = "Wrong access token: ask the study organiser for the token of this study.", 403
        if error:
            return self.signin_page(request, status, error, name, fresh=True)
        # The code typed in, else the one this browser keeps for the annotator last signed in on it.
        codes = [*(form.get("code") or [""])[:1], request.cookies.get(CODE_COOKIE) or ""]
        try:
            name, code = self.store.sign_in(name, codes)
        except NameTaken as e:
            return self.signin_page(request, 403, f"The name {e.display_name!r} belongs to an annotator already. If "
                                    "that is you, type in your personal code too (your pages show it while you are "
                                    "signed in; ask the study organiser if you do not have it); otherwise choose "
                                    "another name.", name, fresh=True)
        old = request.cookies.get(COOKIE)
        if old:
            self.store.end_session(old)  # a sign-in always starts a new session, never adopts an existing one
        now = self.clock()
        self.store.forget_sessions(idle_before=now - SESSION_IDLE_S, created_before=now - SESSION_MAX_S)
        session_token, _ = self.store.create_session(name, now)
        response = to("/next")
        response.set_cookie(COOKIE, session_token, max_age=SESSION_MAX_S, httponly=True, samesite="lax", path="/",
                            secure=secure(request))
        # Only this annotator's code: whoever signs in next on this browser must type their own.
        response.set_cookie(CODE_COOKIE, code, max_age=CODE_COOKIE_MAX_AGE_S, httponly=True, samesite="lax",
                            path="/", secure=secure(request))
        response.delete_cookie(FORMER_CODES_COOKIE, path="/")
        response.delete_cookie(SIGNIN_COOKIE, path="/")
        log.info("%s signed in", name)
        return response

    def signout(self, request: Request, form: dict[str, list[str]]) -> Response:
        session, _ = self.current(request)
        if session is not None:
            if not csrf_ok(form, session.csrf):
                return self.message("Not signed out", "This sign-out form was out of date or sent from another site: "
                                    "use the Sign out button of a page of this study.", 403, session)
            self.store.end_session(request.cookies[COOKIE])
        response = signed_out(False)
        # Signing out forgets the code too: on a shared browser, the next person cannot sign in under this name.
        response.delete_cookie(CODE_COOKIE, path="/")
        response.delete_cookie(FORMER_CODES_COOKIE, path="/")
        return response

    def next_item(self, request: Request) -> Response:
        session, expired = self.current(request)
        if session is None:
            return signed_out(expired)
        answered = self.store.answered(session.annotator)
        for item_id in annotator_order(self.study, session.annotator):
            if item_id not in answered:
                return to(f"/item/{item_id}")
        return self.page("done.html", 200, session, self.own_code(request, session), answered=len(answered))

    def item_page(self, item_id: str, request: Request) -> Response:
        session, expired = self.current(request)
        if session is None:
            return signed_out(expired)
        item = self.study.get(item_id)
        if item is None:
            return self.unknown_item(item_id, session)
        first = self.store.answered(session.annotator).get(item_id)
        if first is not None:
            return self.message("Already answered", f"You answered item {item_id} at {first}; each item is shown "
                                "once per annotator.", 409, session)
        return self.show(request, item, session)

    def submit(self, item_id: str, request: Request, form: dict[str, list[str]], form_error: Optional[str]) -> Response:
        session, expired = self.current(request)
        if session is None:
            why = "has expired" if expired else "has ended"
            return self.message("Signed out", f"Your session {why}, so this answer was not stored: sign in again "
                                "with the same name to continue where you left off.", 401, None, "/signin", "Sign in")
        item = self.study.get(item_id)
        if item is None:
            return self.unknown_item(item_id, session)
        if form_error is not None:
            return self.show(request, item, session, 400, form_error)
        if not csrf_ok(form, session.csrf):
            return self.message("Not stored", "This answer form was out of date or sent from another site, so "
                                "nothing was stored: open the item again and submit it from there.", 403, session,
                                f"/item/{item_id}", "Open the item again")
        try:
            answer = parse_answer(item, form, session.annotator)
        except FormError as e:
            return self.show(request, item, session, 400, str(e), form)  # the page again, with the choices so far
        try:
            self.store.submit(answer)
        except DuplicateSubmission as e:
            return self.message("Already answered", f"{e}.", 409, session)
        log.info("%s answered %s", session.annotator, item_id)
        return to("/next")


async def form_of(request: Request) -> tuple[dict[str, list[str]], Optional[str]]:
    """(the submitted form, or {} with why it could not be read)."""
    try:
        return await read_form(request), None
    except FormError as e:
        return {}, str(e)


def create_app(study: Study, store: AnswerStore, token: Optional[str] = None, *,
               clock: Callable[[], float] = time.time) -> FastAPI:
    """The annotation app for one study; `token`, when set, must be given at sign-in. `clock`: for tests."""
    app = FastAPI(title="detox-sum human evaluation", docs_url=None, redoc_url=None, openapi_url=None)
    app.add_middleware(RequestGuard, max_body=MAX_FORM_BYTES)
    pages = AnnotationPages(study, store, token, clock)
    # Plain functions: FastAPI runs them in its threadpool.
    for path, handler in (("/healthz", pages.healthz), ("/", pages.home), ("/signin", pages.signin_form),
                          ("/next", pages.next_item), ("/item/{item_id}", pages.item_page)):
        app.get(path)(handler)

    # A form's body arrives on the event loop; what is done with it, in the threadpool as well.
    @app.post("/signin")
    async def signin(request: Request) -> Response:
        form, _ = await form_of(request)  # an unreadable form has no CSRF token: refused as such
        return await run_in_threadpool(pages.signin, request, form)

    @app.post("/signout")
    async def signout(request: Request) -> Response:
        form, _ = await form_of(request)
        return await run_in_threadpool(pages.signout, request, form)

    @app.post("/item/{item_id}")
    async def submit(item_id: str, request: Request) -> Response:
        form, error = await form_of(request)
        return await run_in_threadpool(pages.submit, item_id, request, form, error)

    return app
