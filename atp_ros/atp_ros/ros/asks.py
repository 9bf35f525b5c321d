"""The node's ask endpoints: the ``~/ask`` action and the ``~/ask_sync`` service.

Each ask goes through the worker's priority slot (ahead of the camera stream); the action
publishes ``queued`` / ``running`` feedback and can be cancelled; both give up after
``limits.ask_timeout_s`` or when the inference thread is gone.
"""

from __future__ import annotations

import time
from concurrent import futures

from rclpy.action import ActionServer, CancelResponse, GoalResponse

from atp_ros.backends.errors import GenerationStopped
from atp_ros.ros import messages
from atp_ros.ros.callbacks import guarded
from atp_ros.ros.worker import WARN, BadInput
from atp_ros_msgs.action import Ask as AskAction
from atp_ros_msgs.msg import VlmAnswer
from atp_ros_msgs.srv import Ask

FEEDBACK_PERIOD_S = 0.2  # ~/ask feedback while a goal waits or runs


class AskEndpoints:
    """Mixin of :class:`~atp_ros.ros.node.VlmNode`: uses its ``worker``, ``state``, ``model_id``,
    ``_param``, ``_report`` and ``_ask_group``."""

    def _create_asks(self) -> None:
        """Create the action server and the service (on configure)."""
        self._asks = [
            ActionServer(
                self,
                AskAction,
                "~/ask",
                execute_callback=self._execute_ask,
                goal_callback=lambda _goal: GoalResponse.ACCEPT,
                cancel_callback=lambda _goal: CancelResponse.ACCEPT,
                callback_group=self._ask_group,
            ),
            self.create_service(Ask, "~/ask_sync", self._on_ask_sync, callback_group=self._ask_group),
        ]

    def _destroy_asks(self) -> None:
        for endpoint in self._asks:
            if isinstance(endpoint, ActionServer):
                endpoint.destroy()
            else:
                self.destroy_service(endpoint)
        self._asks = []

    def _ask(self, question: str, camera: str, max_age_s: float, goal_handle=None) -> tuple[str, VlmAnswer | None]:
        """Run one ask through the worker's priority slot: ``(message, answer)``; ``answer`` None on failure."""
        worker = self.worker
        if worker is None or not worker.running:
            return f"not answering: the node is {self.state}", None
        ticket = worker.ask(question, camera, max_age_s)
        accepted = time.monotonic()
        timeout = self._param("limits.ask_timeout_s")
        while not ticket.future.done():
            if not worker.running:  # stopped or died: nobody will ever answer this ticket
                ticket.cancel()
                return f"not answering: the inference thread is not running (node {self.state})", None
            if time.monotonic() - accepted > timeout:
                ticket.cancel()  # ends it before it runs, or mid-decode within one token
                worker.problem("ask_timeout", WARN, f"ask timed out after {timeout:g} s: {question.strip()[:80]!r}")
                return f"timed out after {timeout:g} s (limits.ask_timeout_s)", None
            if goal_handle is not None:
                if goal_handle.is_cancel_requested:
                    ticket.cancel()
                feedback = AskAction.Feedback(
                    stage="running" if ticket.started.is_set() else "queued",
                    elapsed_ms=(time.monotonic() - accepted) * 1e3,
                )
                goal_handle.publish_feedback(feedback)
            futures.wait([ticket.future], timeout=FEEDBACK_PERIOD_S)
        err = ticket.future.exception()
        if isinstance(err, GenerationStopped):
            return ("cancelled" if ticket.cancelled.is_set() else f"stopped: {err}"), None
        if isinstance(err, BadInput):
            return str(err), None
        if err is not None:
            return f"inference failed: {type(err).__name__}: {err}", None
        return "ok", messages.answer_msg(ticket.future.result(), self.model_id)

    @guarded("ask", fallback=lambda _goal: AskAction.Result(success=False, message="internal error (see the log)"))
    def _execute_ask(self, goal_handle) -> AskAction.Result:
        goal = goal_handle.request
        message, answer = self._ask(goal.question, goal.camera, goal.max_age_s, goal_handle)
        result = AskAction.Result(success=answer is not None, message=message)
        if answer is not None:
            result.answer = answer
            goal_handle.succeed()
        elif message == "cancelled" and goal_handle.is_cancel_requested:
            goal_handle.canceled()
        else:
            goal_handle.abort()
        return result

    @guarded("ask", fallback=lambda _req, resp: resp)
    def _on_ask_sync(self, request: Ask.Request, response: Ask.Response) -> Ask.Response:
        message, answer = self._ask(request.question, request.camera, request.max_age_s)
        response.success, response.message = answer is not None, message
        if answer is not None:
            response.answer = answer
        return response
