"""Ray Serve: one batched VLM deployment shared by many nodes (``atp-serve``), and its client.

Modules, by concern (only those marked Ray import it; nothing here imports ROS):

* ``wire`` -- requests, results, frames as arrays or PNG / JPEG bytes (the node's decoder).
* ``config`` -- :class:`ServeConfig`, serve.yaml, the code version of a deployment.
* ``server`` (Ray) -- the deployment: batching, one backend call per setting, coalescing.
* ``client`` (Ray) -- :class:`RemoteBackend`, the node's ``backend: ray``.
* ``cluster`` (Ray) -- joining, starting and leaving a Ray cluster; what a lost service looks like.
* ``ray_compat`` -- every Ray internal used, checked against one Ray version.
* ``cli`` (Ray) -- the ``atp-serve`` command.
* ``payload`` -- bytes per frame of a split deployment (:func:`embedding_payload`).

Nothing is imported here, so ``import atp_ros.serving.wire`` needs no Ray.
"""
