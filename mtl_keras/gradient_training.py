"""The training step of the gradient weightings (``mtl_keras.weighting.GradientWeighting``), on TF and JAX.

Per step: the per-task gradients of the shared parameters (or, with ``rep_grad``, of the shared representation),
averaged over replicas so that every replica takes the one-device step; the method's direction for the shared
parameters; each task's own gradient for its own parameters. Which parameters are shared is read off the
functional graph: a layer whose output reaches two or more task outputs is shared. Under mixed precision each task
gradient is unscaled before the method and the direction scaled back for ``LossScaleOptimizer``.
"""

import math

import keras
from keras import ops

from mtl_keras import distribution


def _float():
    """The dtype of losses, gradients and directions: the variables' (floatx; float32 under mixed precision)."""
    return keras.config.floatx()


def _producer(tensor):
    history = tensor._keras_history
    return history.operation, history.operation._inbound_nodes[history.node_index]


def _upstream_layers(tensors, stop=()):
    """The layers (by id) that the ``tensors`` depend on, not crossing the tensors in ``stop`` (ids)."""
    seen, stack = {}, list(tensors)
    while stack:
        tensor = stack.pop()
        if id(tensor) in stop:
            continue
        layer, node = _producer(tensor)
        key = (id(layer), id(node))
        if key in seen:
            continue
        seen[key] = layer
        stack.extend(node.input_tensors)
    return {id(layer): layer for layer in seen.values()}


class SharedPartition:
    """The split of a functional multi-task model: ``shared`` variables (used by two or more tasks), ``own``
    ``{task: [variables]}``, the ``representation`` (shared tensors read by task layers) and ``passthrough`` (model
    inputs read by task layers, e.g. the image for its size)."""

    def __init__(self, model, tasks):
        if not isinstance(model, keras.Model) or not isinstance(model.output, dict):
            raise ValueError("Gradient weightings need a functional model with a dict of task outputs.")
        self.tasks = list(tasks)
        outputs = model.output
        reach = {}  # layer id -> set of tasks
        layers = {}
        for task in self.tasks:
            for key, layer in _upstream_layers([outputs[task]]).items():
                reach.setdefault(key, set()).add(task)
                layers[key] = layer
        owner_of_variable = {}
        for key, layer in layers.items():
            owner = "shared" if len(reach[key]) > 1 else next(iter(reach[key]))
            for variable in layer.trainable_variables:
                previous = owner_of_variable.get(id(variable))
                # a variable reused by layers of different owners is shared
                owner_of_variable[id(variable)] = owner if previous in (None, owner) else "shared"
        self.shared, self.own = [], {t: [] for t in self.tasks}
        for variable in model.trainable_variables:
            owner = owner_of_variable.get(id(variable))
            if owner == "shared":
                self.shared.append(variable)
            elif owner is not None:
                self.own[owner].append(variable)
        if not self.shared:
            raise ValueError("The model has no parameters shared by two tasks: nothing for a gradient weighting to do.")
        self.num_shared = sum(math.prod(int(d) for d in v.shape) for v in self.shared)
        shared_layers = {k for k, tasks_ in reach.items() if len(tasks_) > 1}
        self.representation, self.passthrough = [], []
        for key, layer in layers.items():
            if key in shared_layers:
                continue
            for node in layer._inbound_nodes:
                for tensor in node.input_tensors:
                    producer, _ = _producer(tensor)
                    if id(producer) not in shared_layers:
                        continue
                    target = self.passthrough if isinstance(producer, keras.layers.InputLayer) else \
                        self.representation
                    if all(tensor is not t for t in target):
                        target.append(tensor)
        self.model = model
        self._split = None

    def split_models(self):
        """``(encoder, heads)``: ``encoder(images) -> [representation]``, ``heads([representation..., passthrough...])
        -> {task: output}``; they share the model's layers (and so its variables)."""
        if self._split is None:
            inputs = self.model.inputs[0] if len(self.model.inputs) == 1 else self.model.inputs
            encoder = keras.Model(inputs, list(self.representation), name="shared_encoder")
            heads = keras.Model(list(self.representation) + list(self.passthrough),
                                {t: self.model.output[t] for t in self.tasks}, name="task_heads")
            encoder_variables = {id(v) for v in encoder.trainable_variables}
            outside = [v.path for v in self.shared if id(v) not in encoder_variables]
            if outside:
                raise ValueError(f"rep_grad: shared variables {outside[:3]} lie after the shared representation "
                                 f"(tied between task heads); train this model with parameter gradients.")
            self._split = (encoder, heads)
        return self._split


def flatten(tensors):
    return ops.concatenate([ops.reshape(ops.cast(t, _float()), (-1,)) for t in tensors], axis=0)


def unflatten(vector, like, dtype=None):
    """The inverse of :func:`flatten`: pieces shaped like ``like`` (run-time shapes), cast by ``dtype(t)`` if given."""
    pieces, start = [], 0
    for t in like:
        size = ops.size(t)
        piece = ops.reshape(vector[start:start + size], ops.shape(t))
        pieces.append(piece if dtype is None else ops.cast(piece, dtype(t)))
        start = start + size
    return pieces


def _task_gradient_rows(tape, scaled, targets, partition, tasks, scale):
    """TF, one backward pass per task: the (K, P) unscaled gradients of ``targets`` and ``{task: [gradients of its
    own variables]}`` (still scaled)."""
    import tensorflow as tf

    rows, own = [], {}
    for k, task in enumerate(tasks):
        grads = tape.gradient(scaled[k], list(targets) + partition.own[task])
        rows.append(flatten([g if g is not None else tf.zeros_like(v, _float())
                             for g, v in zip(grads[:len(targets)], targets)]) / scale)
        own[task] = grads[len(targets):]
    return ops.stack(rows), own


def split_samples(x, y, samples):
    """The batch cut into ``samples`` strided parts (independent estimates for MoDo, SDMGrad): strided, so that the
    replicas' parts together are the one-device parts (replicas hold contiguous shards)."""
    def part(i):
        return keras.tree.map_structure(lambda t: t[i::samples], (x, y))

    return [part(i) for i in range(samples)]


def loss_scale(optimizer):
    """The optimiser's current loss scale (1 without mixed precision)."""
    return ops.cast(optimizer.scale_loss(ops.ones((), _float())), _float())


def tensorflow_train_step(trainer, data):
    """One training step of ``trainer`` (a ``MultiTaskTrainer`` with a ``GradientWeighting``) on TF."""
    import tensorflow as tf

    x, y, _ = keras.utils.unpack_x_y_sample_weight(data)
    weighting, partition = trainer.loss_weighting, trainer.partition
    method = weighting.method
    optimizer = trainer.optimizer
    replicas = distribution.replicas_in_sync()
    scale = loss_scale(optimizer)
    tasks = trainer.tasks

    if method.gradient_samples > 1:
        return _tensorflow_sampled_step(trainer, x, y, scale, replicas)

    with tf.GradientTape(persistent=True) as tape:
        if weighting.rep_grad:
            encoder, heads = partition.split_models()
            representation = encoder(x, training=True)
            representation = representation if isinstance(representation, (list, tuple)) else [representation]
            for r in representation:
                tape.watch(r)
            passthrough = [x] * len(partition.passthrough)
            y_pred = heads(list(representation) + passthrough, training=True)
        else:
            y_pred = trainer.inference_model(x, training=True)
        losses = [trainer.task_loss(t, y, y_pred) for t in tasks]  # replica losses; their replica mean is global
        global_losses = distribution.cross_replica_mean(ops.stack([ops.cast(v, _float()) for v in losses]))
        if not method.uses_gradients:
            weights = ops.stop_gradient(weighting.loss_weights(global_losses))
            weighted = sum(weights[k] * ops.cast(losses[k], _float()) for k in range(len(tasks))) * scale
        scaled = [ops.cast(v, _float()) * scale for v in losses]

    grads_by_variable = {}
    if not method.uses_gradients:
        variables = partition.shared + [v for t in tasks for v in partition.own[t]]
        for variable, grad in zip(variables, tape.gradient(weighted, variables)):
            grads_by_variable[id(variable)] = grad / replicas if grad is not None else None
    else:
        targets = representation if weighting.rep_grad else partition.shared
        gradients, own = _task_gradient_rows(tape, scaled, targets, partition, tasks, scale)
        for task in tasks:
            for variable, grad in zip(partition.own[task], own[task]):
                grads_by_variable[id(variable)] = grad / replicas if grad is not None else None
        if weighting.rep_grad:
            direction = _tensorflow_rep_direction(weighting, gradients, global_losses, replicas)
            pieces = unflatten(direction * scale, representation, dtype=lambda r: r.dtype)
            encoder_grads = tape.gradient(representation, partition.shared, output_gradients=pieces)
            for variable, grad in zip(partition.shared, encoder_grads):
                grads_by_variable[id(variable)] = grad
        else:
            gradients = distribution.cross_replica_mean(gradients)
            direction = weighting.direction(gradients, global_losses)
            for variable, grad in zip(partition.shared, unflatten(direction * scale / replicas, partition.shared)):
                grads_by_variable[id(variable)] = grad
    del tape
    _apply(trainer, grads_by_variable)
    if method.needs_losses_after_step:
        _tensorflow_after_step(trainer, x, y, global_losses)
    return trainer.record_step(global_losses, x, y, y_pred)


def _tensorflow_rep_direction(weighting, gradients, global_losses, replicas):
    """This replica's slice of the direction computed on all replicas' (gathered) representation gradients."""
    if replicas == 1:
        return weighting.direction(gradients, global_losses)
    import tensorflow as tf

    context = tf.distribute.get_replica_context()
    # dL/drep_r of the global loss is (1/R) dL_r/drep_r (the replica loss L_r is R times its share)
    gathered = tf.reshape(context.all_gather(gradients / replicas, axis=1), [gradients.shape[0], -1])
    direction = weighting.direction(gathered, global_losses)
    # Replicas may hold different numbers of samples (a last partial batch): each starts after the ones before it.
    size = tf.shape(gradients)[1]
    sizes = context.all_gather(tf.reshape(size, [1]), axis=0)
    replica = tf.cast(context.replica_id_in_sync_group, tf.int32)
    start = tf.reduce_sum(tf.where(tf.range(replicas) < replica, sizes, tf.zeros_like(sizes)))
    return tf.slice(direction, [start], [size])


def _tensorflow_sampled_step(trainer, x, y, scale, replicas):
    """MoDo, SDMGrad: per-task gradients of each part of the batch."""
    import tensorflow as tf

    weighting, partition = trainer.loss_weighting, trainer.partition
    tasks = trainer.tasks
    samples = []
    grads_by_variable = {}
    all_losses = []
    parts = split_samples(x, y, weighting.method.gradient_samples)
    for part_x, part_y in parts:
        with tf.GradientTape(persistent=True) as tape:
            y_pred = trainer.inference_model(part_x, training=True)
            losses = [ops.cast(trainer.task_loss(t, part_y, y_pred), _float()) for t in tasks]
            scaled = [v * scale for v in losses]
        rows, own = _task_gradient_rows(tape, scaled, partition.shared, partition, tasks, scale)
        del tape
        for task in tasks:
            for variable, grad in zip(partition.own[task], own[task]):
                if grad is None:
                    continue
                grad = grad / (replicas * len(parts))  # the task's gradient on the whole batch: mean of the parts
                previous = grads_by_variable.get(id(variable))
                grads_by_variable[id(variable)] = grad if previous is None else previous + grad
        samples.append(rows)
        all_losses.append(distribution.cross_replica_mean(ops.stack(losses)))
    gradients = distribution.cross_replica_mean(ops.stack(samples))
    global_losses = sum(all_losses) / len(all_losses)
    direction = weighting.direction(gradients, global_losses)
    for variable, grad in zip(partition.shared, unflatten(direction * scale / replicas, partition.shared)):
        grads_by_variable[id(variable)] = grad
    _apply(trainer, grads_by_variable)
    return trainer.record_step(global_losses, x, y, None)


def _tensorflow_after_step(trainer, x, y, global_losses):
    """The losses on the same batch after the update (FAMO); batch-norm statistics are left as they were."""
    model = trainer.inference_model
    saved = [ops.convert_to_tensor(v.value) for v in model.non_trainable_variables]
    y_after = model(x, training=True)
    after = ops.stack([distribution.cross_replica_mean(ops.cast(trainer.task_loss(t, y, y_after), _float()))
                       for t in trainer.tasks])
    for variable, value in zip(model.non_trainable_variables, saved):
        variable.assign(value)
    trainer.loss_weighting.after_step(global_losses, ops.stop_gradient(after))


def _apply(trainer, grads_by_variable):
    pairs = [(grads_by_variable[id(v)], v) for v in trainer.trainable_variables
             if grads_by_variable.get(id(v)) is not None]
    trainer.optimizer.apply_gradients(pairs)


def jax_train_step(trainer, state, data):
    """One stateless training step on JAX (``JAXTrainer.train_step``'s counterpart); under ``DataParallel`` one
    global SPMD computation on the global batch's gradients."""
    trainable, non_trainable, optimizer_variables, metrics_variables = state
    x, y, _ = keras.utils.unpack_x_y_sample_weight(data)
    weighting = trainer.loss_weighting
    method = weighting.method
    optimizer = trainer.optimizer
    with keras.StatelessScope(state_mapping=list(zip(optimizer.variables, optimizer_variables))):
        scale = loss_scale(optimizer)
    step = _JaxStep(trainer, trainable, scale)
    if not method.uses_gradients:
        grads, losses, y_pred, non_trainable = step.loss_only(x, y, non_trainable)
    elif weighting.rep_grad:
        grads, losses, y_pred, non_trainable = step.representation(x, y, non_trainable)
    else:
        grads, losses, y_pred, non_trainable = step.parameters(x, y, non_trainable)
    trainable, optimizer_variables = optimizer.stateless_apply(optimizer_variables, [g * scale for g in grads],
                                                               trainable)
    if method.needs_losses_after_step:
        after, _, _ = step.run(trainable, x, y, non_trainable)  # batch-norm statistics of this pass are dropped
        non_trainable = step.weighting_call(non_trainable, weighting.after_step, ops.stop_gradient(losses),
                                            ops.stop_gradient(after))[1]
    mapping = list(zip(trainer.metrics_variables, metrics_variables)) + \
        list(zip(trainer.non_trainable_variables, non_trainable))
    with keras.StatelessScope(state_mapping=mapping) as scope:
        logs = trainer.record_step(losses, x, y, y_pred)
    metrics_variables = _current(scope, trainer.metrics_variables, metrics_variables)
    return logs, (trainable, non_trainable, optimizer_variables, metrics_variables)


def _current(scope, variables, old_values):
    values = [scope.get_current_value(v) for v in variables]
    return [old if value is None else value for value, old in zip(values, old_values)]


class _JaxStep:
    """The pieces of one JAX step; every gradient returned is unscaled (loss scale divided out)."""

    def __init__(self, trainer, trainable, scale):
        self.trainer = trainer
        self.trainable = trainable
        self.scale = scale
        self.tasks = trainer.tasks
        self.partition = trainer.partition
        index = {id(v): i for i, v in enumerate(trainer.trainable_variables)}
        self.shared_index = [index[id(v)] for v in self.partition.shared]
        self.own_index = {t: [index[id(v)] for v in self.partition.own[t]] for t in self.tasks}

    def run(self, trainable_values, inputs, targets, non_trainable_values, model=None, model_inputs=None):
        """Task losses (K,), outputs and the pass's new non-trainable values, as a pure function of the values."""
        trainer = self.trainer
        mapping = list(zip(trainer.trainable_variables, trainable_values)) + \
            list(zip(trainer.non_trainable_variables, non_trainable_values))
        with keras.StatelessScope(state_mapping=mapping) as scope:
            y_pred = (model or trainer.inference_model)(inputs if model_inputs is None else model_inputs,
                                                        training=True)
            losses = ops.stack([ops.cast(trainer.task_loss(t, targets, y_pred), _float()) for t in self.tasks])
        return losses, y_pred, _current(scope, trainer.non_trainable_variables, non_trainable_values)

    def weighting_call(self, non_trainable, fn, *args):
        """Calls a weighting method that updates the weighting's state variables; returns (result, new values)."""
        variables = self.trainer.non_trainable_variables
        with keras.StatelessScope(state_mapping=list(zip(variables, non_trainable))) as scope:
            result = fn(*args)
        return result, _current(scope, variables, non_trainable)

    def _jacobian(self, function, argument):
        """Unscaled Jacobian (per leaf (K, *shape)) of ``function``: K VJPs of one forward pass, or ``jacrev``."""
        import jax

        if self.trainer.jacobian_mode == "batched":
            jac, aux = jax.jacrev(function, has_aux=True)(argument)
        else:
            _, vjp, aux = jax.vjp(function, argument, has_aux=True)
            eye = jax.numpy.eye(len(self.tasks), dtype=_float())
            rows = [vjp(eye[k])[0] for k in range(len(self.tasks))]
            jac = jax.tree_util.tree_map(lambda *leaves: ops.stack(leaves), *rows)
        return jax.tree_util.tree_map(lambda j: j / self.scale, jac), aux

    def _assemble(self, direction, jac, grads=None):
        """Shared variables from ``direction``, each task's own variables from its row of ``jac``."""
        grads = list(grads) if grads is not None else [ops.zeros_like(v) for v in self.trainable]
        if direction is not None:
            for i, piece in zip(self.shared_index, unflatten(direction, self.partition.shared)):
                grads[i] = piece
        for k, task in enumerate(self.tasks):
            for i in self.own_index[task]:
                grads[i] = grads[i] + jac[i][k]
        return grads

    def parameters(self, x, y, non_trainable):
        weighting = self.trainer.loss_weighting
        samples = weighting.method.gradient_samples
        parts = split_samples(x, y, samples) if samples > 1 else [(x, y)]
        rows, losses, own, y_pred = [], [], None, None
        for part_x, part_y in parts:
            def f(values, part_x=part_x, part_y=part_y, nt=non_trainable):
                losses_, y_pred_, new_nt = self.run(values, part_x, part_y, nt)
                return losses_ * self.scale, (losses_, y_pred_, new_nt)

            jac, (part_losses, y_pred, non_trainable) = self._jacobian(f, self.trainable)
            rows.append(flatten_jacobian([jac[i] for i in self.shared_index], len(self.tasks)))
            losses.append(part_losses)
            jac = [j / len(parts) for j in jac]  # own parameters: the mean of the parts' gradients
            own = jac if own is None else [a + b for a, b in zip(own, jac)]
        gradients = rows[0] if samples == 1 else ops.stack(rows)
        losses = sum(losses) / len(losses)
        direction, non_trainable = self.weighting_call(non_trainable, weighting.direction, gradients,
                                                       ops.stop_gradient(losses))
        return self._assemble(direction, own), losses, (y_pred if samples == 1 else None), non_trainable

    def loss_only(self, x, y, non_trainable):
        """Weights from the losses, then one backward pass of sum_k w_k L_k (one forward pass in all)."""
        import jax

        def f(values):
            losses_, y_pred_, new_nt = self.run(values, x, y, non_trainable)
            return losses_ * self.scale, (losses_, y_pred_, new_nt)

        _, vjp, (losses, y_pred, non_trainable) = jax.vjp(f, self.trainable, has_aux=True)
        weights, non_trainable = self.weighting_call(non_trainable, self.trainer.loss_weighting.loss_weights,
                                                     ops.stop_gradient(losses))
        (grads,) = vjp(ops.stop_gradient(weights))
        return [g / self.scale for g in grads], losses, y_pred, non_trainable

    def representation(self, x, y, non_trainable):
        """rep_grad: per-task gradients of the representation; the direction is pulled back through the encoder."""
        import jax

        trainer, partition = self.trainer, self.partition
        encoder, heads = partition.split_models()
        variables = trainer.trainable_variables

        def encode(values):
            mapping = list(zip(variables, values)) + list(zip(trainer.non_trainable_variables, non_trainable))
            with keras.StatelessScope(state_mapping=mapping) as scope:
                rep = encoder(x, training=True)
            rep = list(rep) if isinstance(rep, (list, tuple)) else [rep]
            return rep, _current(scope, trainer.non_trainable_variables, non_trainable)

        representation, encode_vjp, non_trainable = jax.vjp(encode, self.trainable, has_aux=True)

        def heads_losses(arguments, nt=non_trainable):
            rep, values = arguments
            losses_, y_pred_, new_nt = self.run(values, x, y, nt, model=heads,
                                                model_inputs=list(rep) + [ops.convert_to_tensor(x)] *
                                                len(partition.passthrough))
            return losses_ * self.scale, (losses_, y_pred_, new_nt)

        (rep_jac, param_jac), (losses, y_pred, non_trainable) = self._jacobian(heads_losses,
                                                                             (representation, self.trainable))
        gradients = flatten_jacobian(rep_jac, len(self.tasks))
        direction, non_trainable = self.weighting_call(non_trainable, trainer.loss_weighting.direction, gradients,
                                                       ops.stop_gradient(losses))
        # scaled for the (float16) backward pass through the encoder, in the representation's dtype
        (encoder_grads,) = encode_vjp(unflatten(direction * self.scale, representation, dtype=lambda r: r.dtype))
        encoder_grads = [g / self.scale for g in encoder_grads]
        return self._assemble(None, param_jac, encoder_grads), losses, y_pred, non_trainable


def flatten_jacobian(per_variable, num_tasks):
    """(K, P) from a list of (K, *shape) per-variable Jacobian blocks."""
    return ops.concatenate([ops.reshape(ops.cast(j, _float()), (num_tasks, -1)) for j in per_variable], axis=1)
