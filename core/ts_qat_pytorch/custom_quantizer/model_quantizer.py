"""ModelQuantizer: turns a traced float GraphModule into a QAT GraphModule.

Passes, in order, each a method a backend may override:
  0. ``drop_identities``: ``nn.Identity`` nodes (a BatchNorm folded away by ``tools.fold_bn``, timm's disabled norms
     and activations) are removed, so conv -> Identity -> ReLU fuses like conv -> ReLU.
  1. ``fuse``: conv/linear + BatchNorm (+ReLU) -> fused QAT layers (fuser_method_mappings, plus the patterns
     of ``extra_fuse_dict``).
  2. ``swap``: remaining conv/linear/embedding layers -> QAT layers with weight fake quantization.
  3. ``insert_act_quantizers``: activation fake quantizers where the operator table says the deployed
     graph needs integers (quantization/op_table.py), one quantizer per tensor.
  4. ``share_concat_scales`` (backends with ``shared_concat_scales``): the inputs and output of each torch.cat
     share one quantizer, so the deployed concat is a memory copy.
  5. ``build_act_quantizers``: the activation quantizers placed by passes 3 and 4 are built, each once, with the
     configuration of the layer whose input or output it quantizes (``module_qconfig``), else the model-wide one.
  6. ``link_input_quantizers``: each QAT layer learns the quantizer of its input (``input_fake_quant``), whose
     scale puts its bias on the deployed int32 grid.

Weight quantizers are built in passes 1 and 2 with their layer's ``module_qconfig``.
"""
from __future__ import annotations

import copy
import difflib
import logging
import operator
from dataclasses import dataclass
from typing import Mapping

import torch
from torch import fx, nn

from ..fake_quantize import QuantizeBase
from ..fuser_method_mappings import FUSABLE_ACTIVATION_MODULES, FUSION_PATTERNS, build_fused, fusion_table
from ..nn.qat import QAT_MODULE_MAPPING, QATMixin
from ..quantization.op_table import (BOUNDED_ACT_MAX, FLOAT, FLOAT_WARN, FUSABLE_ACT_FUNCTIONS,
                                     FUSABLE_ACT_METHODS, INDEX, OP_INDEX, PASSTHROUGH, QUANTIZED,
                                     SHAPE_FUNCTIONS, SHAPE_METHODS, OpRow)
from ..quantization.overrides import activation_qconfigs, check_layer_names, layer_qconfig
from ..quantization.qconfig import QConfig, resolve_dotted

logger = logging.getLogger(__name__)

EXTRA_QUANTIZER_KEYS = ("exclude_module_name", "exclude_node_name", "additional_function_type",
                        "additional_module_type", "float_outputs", "shared_concat_scales")
_BOOL_KEYS = ("float_outputs", "shared_concat_scales")
# Layers whose integer kernel can write float directly (onnxruntime: QGemm without an output scale,
# MatMulIntegerToFloat), so a float consumer needs no QuantizeLinear/DequantizeLinear pair in between.
_FLOAT_OUTPUT_ROWS = ("Linear", "matmul")
_TUPLE_PRODUCERS = {"split", "chunk", "min", "max", "unbind", "topk", "sort"}


@dataclass
class PlannedQuantizer:
    """An activation quantizer placed in the graph (passes 3 and 4), built in pass 5 once the layers around it
    say which configuration it takes."""

    per_channel: bool = False
    bound: float | None = None  # the maximum of an absorbed ReLU6-like activation: caps the scale of unsigned grids
    shared_sites: int = 1  # call sites per forward of a quantizer that a concatenation's inputs share (pass 4)


class ModelQuantizer:
    """Backend-neutral QAT graph rewriting. Backends subclass and register (see ``custom_quantizer``)."""

    # The bit widths a backend accepts; subclasses narrow or widen it.
    allowed_bits = range(8, 9)
    # Activation widths accepted beyond allowed_bits, never for weights (16: W8A16 layers, exported as 16-bit
    # QuantizeLinear/DequantizeLinear at opset 21).
    wide_activation_bits: tuple[int, ...] = ()
    # Linear / matmul outputs that only float operations (or the model's output) consume stay float
    # (extra_quantizer_dict "float_outputs" overrides). Off for integer accelerators, whose kernels write
    # integers; on for onnxruntime, whose QGemm / MatMulIntegerToFloat write float at no cost.
    float_outputs = False
    # The inputs and output of a torch.cat share one quantizer (extra_quantizer_dict "shared_concat_scales"
    # overrides): NPU converters (RKNN, ...) and integer runtimes then copy the inputs without requantizing.
    # Off where the runtime requantizes per input anyway (onnxruntime's QLinearConcat): separate grids fit tighter.
    shared_concat_scales = False
    # A BatchNorm2d with no conv to fold into runs as a depthwise 1x1 conv that it folds into (an integer kernel)
    # instead of a float BatchNormalization between integer layers.
    batch_norms_as_convs = True
    # (layer type, norm type or None, has activation) -> fused QAT class; a backend may set its own table
    fusion_patterns = FUSION_PATTERNS

    def __init__(self, extra_quantizer_dict: dict | None = None, extra_fuse_dict: dict | None = None):
        self.fusion_patterns = fusion_table(extra_fuse_dict, self.fusion_patterns)
        extra = dict(extra_quantizer_dict or {})
        unknown = sorted(set(extra) - set(EXTRA_QUANTIZER_KEYS))
        if unknown:
            raise ValueError(f"unknown extra_quantizer_dict keys {unknown}; valid keys: {list(EXTRA_QUANTIZER_KEYS)}")
        self.exclude_module_name = list(extra.get("exclude_module_name", []))
        self.exclude_node_name = set(extra.get("exclude_node_name", []))
        self.additional_function_type = tuple(resolve_dotted(f) for f in extra.get("additional_function_type", []))
        self.additional_module_type = tuple(resolve_dotted(m) for m in extra.get("additional_module_type", []))
        for key in _BOOL_KEYS:
            if extra.get(key) is not None:
                if not isinstance(extra[key], bool):
                    raise ValueError(f"extra_quantizer_dict['{key}'] must be True or False, got {extra[key]!r}")
                setattr(self, key, extra[key])
        self.module_qconfig: dict[str, QConfig] = {}
        self.planned: dict[str, PlannedQuantizer] = {}

    # -- entry point -------------------------------------------------------------------------------
    def prepare(self, gm: fx.GraphModule, qconfig: QConfig,
                module_qconfig: Mapping[str, QConfig] | None = None) -> fx.GraphModule:
        """The passes above, in order. ``module_qconfig``: {layer or block name: QConfig} laid over ``qconfig`` for
        that layer's quantizers (quantization/overrides.py; prepare_by_platform builds it from the user's dict)."""
        qconfig.check_bits(self.allowed_bits, self.wide_activation_bits)
        self.module_qconfig = dict(module_qconfig or {})
        self._check_exclusions(gm)
        self._extend_exclusions(gm)
        self.drop_identities(gm)
        self.fuse(gm, qconfig)
        self.swap(gm, qconfig)
        check_layer_names(self.module_qconfig, self._quantized_layers(gm))
        self.insert_act_quantizers(gm, qconfig)
        if self.shared_concat_scales:
            self.share_concat_scales(gm)
        self.build_act_quantizers(gm, qconfig)
        self.link_input_quantizers(gm)
        gm.delete_all_unused_submodules()
        gm.graph.lint()
        gm.recompile()
        for name, mod in gm.named_modules():
            if isinstance(mod, QuantizeBase):
                mod.qualname = name
        return gm

    # -- helpers -----------------------------------------------------------------------------------
    def layer_qconfig(self, layer: str, qconfig: QConfig) -> QConfig:
        """The configuration of one layer's quantizers: its ``module_qconfig`` entry, else the model-wide one."""
        return layer_qconfig(layer, self.module_qconfig) or qconfig

    @staticmethod
    def _quantized_layers(gm: fx.GraphModule) -> list[str]:
        return [n for n, m in gm.named_modules() if hasattr(m, "weight_fake_quant")]

    def _planned_call(self, node: fx.Node) -> str | None:
        """The name of the planned activation quantizer a node calls, or None."""
        return str(node.target) if node.op == "call_module" and node.target in self.planned else None

    def _check_exclusions(self, gm: fx.GraphModule) -> None:
        names = [n for n, _ in gm.named_modules() if n]
        for ex in self.exclude_module_name:
            if not any(n == ex or n.startswith(ex + ".") for n in names):
                close = difflib.get_close_matches(ex, names, n=3)
                raise ValueError(f"exclude_module_name: no module named '{ex}' in the traced model"
                                 + (f"; did you mean {close}?" if close else ""))
        node_names = {n.name for n in gm.graph.nodes}
        for ex in self.exclude_node_name:
            if ex not in node_names:
                close = difflib.get_close_matches(ex, list(node_names), n=3)
                raise ValueError(f"exclude_node_name: no node named '{ex}' in the traced graph"
                                 + (f"; did you mean {close}?" if close else ""))

    def _extend_exclusions(self, gm: fx.GraphModule) -> None:
        """An excluded conv/linear takes its BatchNorm and activation with it: the whole layer stays float
        (quantizing the BN's input would quantize the excluded layer's output)."""
        for node in gm.graph.nodes:
            if not self.is_excluded(node) or node.op != "call_module":
                continue
            cur = node
            while len(cur.users) == 1:
                (user,) = cur.users
                mod = self._module(gm, user)
                if not (isinstance(mod, nn.modules.batchnorm._BatchNorm) or self._is_fusable_act(gm, user)):
                    break
                self.exclude_node_name.add(user.name)
                cur = user

    def is_excluded(self, node: fx.Node) -> bool:
        if node.name in self.exclude_node_name:
            return True
        if node.op == "call_module":
            t = str(node.target)
            return any(t == ex or t.startswith(ex + ".") for ex in self.exclude_module_name)
        return False

    @staticmethod
    def _module(gm: fx.GraphModule, node: fx.Node) -> nn.Module | None:
        return gm.get_submodule(node.target) if node.op == "call_module" else None

    def _is_fusable_act(self, gm, node: fx.Node) -> bool:
        if self.is_excluded(node):
            return False
        if node.op == "call_module":
            return type(self._module(gm, node)) in FUSABLE_ACTIVATION_MODULES
        if node.op == "call_function" and node.target in FUSABLE_ACT_FUNCTIONS:
            # hardtanh only with its ReLU6-like default bounds is a deployable Clip we can fold
            return node.target is not torch.nn.functional.hardtanh
        return node.op == "call_method" and node.target in FUSABLE_ACT_METHODS

    @staticmethod
    def _act_module(gm, node: fx.Node) -> nn.Module:
        if node.op == "call_module":
            return copy.deepcopy(gm.get_submodule(node.target))
        return nn.ReLU6() if node.target is torch.nn.functional.relu6 else nn.ReLU()

    @staticmethod
    def _act_bound(mod_or_fn) -> float | None:
        return BOUNDED_ACT_MAX.get(type(mod_or_fn), BOUNDED_ACT_MAX.get(mod_or_fn))

    # -- pass 0: no-op modules ---------------------------------------------------------------------
    def drop_identities(self, gm: fx.GraphModule) -> None:
        for node in list(gm.graph.nodes):
            if node.op == "call_module" and type(self._module(gm, node)) is nn.Identity and len(node.args) == 1 \
                    and isinstance(node.args[0], fx.Node) and not node.kwargs and not self.is_excluded(node):
                node.replace_all_uses_with(node.args[0])
                gm.graph.erase_node(node)

    # -- pass 1: fusion ----------------------------------------------------------------------------
    def fuse(self, gm: fx.GraphModule, qconfig: QConfig) -> None:
        for node in list(gm.graph.nodes):
            self._fuse_at(gm, node, qconfig)
        if self.batch_norms_as_convs:  # the BatchNorms left could not fold: per-channel integer ops instead
            for node in list(gm.graph.nodes):
                conv = self._batch_norm_as_conv(gm, node)
                if conv is not None:
                    self._fuse_at(gm, conv, qconfig)

    def _batch_norm_as_conv(self, gm: fx.GraphModule, node: fx.Node) -> fx.Node | None:
        """A BatchNorm2d with no conv before it to fold into (pre-activation blocks, a BN after a concat or an add,
        RepVGG's identity branch) gets one: a depthwise 1x1 conv with weight 1, which the BN then folds into like
        any conv, so the deployed graph runs it as an integer per-channel kernel. The conv's weight is not part of
        the float model (``float_state_dict`` leaves it out)."""
        if node.op != "call_module" or self.is_excluded(node) or type(self._module(gm, node)) is not nn.BatchNorm2d \
                or len(node.args) != 1 or node.kwargs or not isinstance(node.args[0], fx.Node):
            return None
        bn = self._module(gm, node)
        conv = nn.Conv2d(bn.num_features, bn.num_features, 1, groups=bn.num_features, bias=False)
        with torch.no_grad():
            conv.weight.fill_(1.0)
        conv.stands_for_batch_norm = True
        parent, _, name = node.target.rpartition(".")
        path = f"{parent}.{name}_as_conv" if parent else f"{name}_as_conv"
        _set_module(gm, path, conv)
        with gm.graph.inserting_before(node):
            conv_node = gm.graph.call_module(path, (node.args[0],))
        node.replace_input_with(node.args[0], conv_node)
        return conv_node

    def _fuse_at(self, gm: fx.GraphModule, node: fx.Node, qconfig: QConfig) -> None:
        """Fuse the layer called at ``node`` with the BatchNorm and activation after it (fusion_patterns)."""
        patterns = self.fusion_patterns
        if node.op != "call_module" or self.is_excluded(node):
            return
        layer = self._module(gm, node)
        if type(layer) not in {k[0] for k in patterns}:
            return
        last, bn, bn_name, act = node, None, None, None
        users = list(last.users)
        if len(users) == 1 and users[0].op == "call_module" and not self.is_excluded(users[0]):
            cand = self._module(gm, users[0])
            if any((type(layer), type(cand), a) in patterns for a in (False, True)):
                bn, bn_name, last = cand, users[0].target, users[0]
        elif type(layer) is nn.Linear and self._token_batch_norm(gm, node) is not None:
            bn_node, last = self._token_batch_norm(gm, node)
            bn, bn_name = self._module(gm, bn_node), bn_node.target
        users = list(last.users)
        if len(users) == 1 and self._is_fusable_act(gm, users[0]) and users[0].args[0] is last:
            act_node = users[0]
            act = self._act_module(gm, act_node)
            last = act_node
        key = (type(layer), type(bn) if bn is not None else None, act is not None)
        if key not in patterns or (bn is None and act is None):
            return
        fused = build_fused(patterns[key], layer, bn, act, self.layer_qconfig(node.target, qconfig).weight,
                            bn_name)
        if getattr(layer, "stands_for_batch_norm", False):
            fused.stands_for_batch_norm = True
        _set_module(gm, node.target, fused)
        if last is not node:
            last.replace_all_uses_with(node)
            # erase the absorbed bn / act nodes (walk back from last to node)
            chain, cur = [], last
            while cur is not node:
                chain.append(cur)
                cur = cur.args[0]
            for n in chain:
                gm.graph.erase_node(n)
        logger.debug("fused %s -> %s", node.target, type(fused).__name__)

    def _token_batch_norm(self, gm, node: fx.Node) -> tuple[fx.Node, fx.Node] | None:
        """``linear(x) -> flatten(0, 1) -> BatchNorm1d -> reshape_as(linear(x))`` (LeViT's LinearNorm: a BatchNorm over
        the tokens of a (batch, tokens, channels) output): (the BatchNorm node, the reshape node), which fold like
        Linear -> BatchNorm1d; the fused layer normalises over all leading dimensions (nn/qat/fused.py)."""
        flat = [u for u in node.users if u.op == "call_method" and u.target == "flatten"
                or u.op == "call_function" and u.target is torch.flatten]
        if len(node.users) != 2 or len(flat) != 1 or len(flat[0].users) != 1:
            return None
        dims = tuple(flat[0].args[1:]) + tuple(flat[0].kwargs.values())
        if dims not in ((0, 1), (0, -2)):
            return None
        (bn_node,) = flat[0].users
        if bn_node.op != "call_module" or self.is_excluded(bn_node) \
                or type(self._module(gm, bn_node)) is not nn.BatchNorm1d or len(bn_node.users) != 1:
            return None
        (back,) = bn_node.users
        if back.op == "call_method" and back.target == "reshape_as" and tuple(back.args) == (bn_node, node):
            return bn_node, back
        return None

    # -- pass 2: QAT layers ------------------------------------------------------------------------
    def swap(self, gm: fx.GraphModule, qconfig: QConfig) -> None:
        for node in gm.graph.nodes:
            if node.op != "call_module":
                continue
            mod = self._module(gm, node)
            if isinstance(mod, nn.RNNBase):
                logger.warning("%s '%s' stays float: recurrent layers are not quantized by this toolkit "
                               "(its inputs and outputs are quantized where neighbours need it)",
                               type(mod).__name__, node.target)
                continue
            if self.is_excluded(node) or type(mod) not in QAT_MODULE_MAPPING:
                if type(mod) not in QAT_MODULE_MAPPING and isinstance(mod, tuple(QAT_MODULE_MAPPING)) \
                        and not hasattr(mod, "weight_fake_quant"):
                    logger.warning("'%s' (%s) subclasses %s with its own forward; it stays float. Exclude it "
                                   "explicitly or make it a plain layer to quantize it.", node.target,
                                   type(mod).__name__, type(mod).__mro__[1].__name__)
                continue
            weight = self.layer_qconfig(node.target, qconfig).weight
            _set_module(gm, node.target, QAT_MODULE_MAPPING[type(mod)].from_float(mod, weight))

    # -- pass 3: activation quantizers ------------------------------------------------------------
    def classify(self, gm: fx.GraphModule, node: fx.Node) -> str | None:
        """The node's treatment (op_table), or None for graph inputs/outputs/constants."""
        if node.op in ("placeholder", "get_attr", "output"):
            return None
        if self.is_excluded(node):
            return FLOAT
        if node.op == "call_module":
            mod = self._module(gm, node)
            if isinstance(mod, QuantizeBase):
                return None
            if self.additional_module_type and isinstance(mod, self.additional_module_type):
                return QUANTIZED
        elif node.op == "call_function":
            if node.target in self.additional_function_type:
                return QUANTIZED
            if node.target in SHAPE_FUNCTIONS:
                return INDEX
        elif node.op == "call_method" and node.target in SHAPE_METHODS:
            return INDEX
        row = self._row(gm, node)
        return row.treatment if row is not None else FLOAT

    def _row(self, gm: fx.GraphModule, node: fx.Node) -> OpRow | None:
        """The operator-table row of a call node (None: not in the table)."""
        if node.op == "call_module":
            mod = self._module(gm, node)
            return OP_INDEX.lookup_module(mod) if mod is not None else None
        if node.op == "call_function":
            return OP_INDEX.functions.get(node.target)
        if node.op == "call_method":
            return OP_INDEX.methods.get(node.target)
        return None

    def _output_stays_float(self, gm: fx.GraphModule, node: fx.Node) -> bool:
        """float_outputs: a Linear / matmul whose every consumer is a float op, an index op or the model output
        gets no output quantizer (the deployed integer kernel writes float)."""
        row = self._row(gm, node)
        if not self.float_outputs or not node.users or row is None or row.name not in _FLOAT_OUTPUT_ROWS:
            return False
        return all(u.op == "output" or self.classify(gm, u) in (FLOAT, FLOAT_WARN, INDEX) for u in node.users)

    def insert_act_quantizers(self, gm: fx.GraphModule, qconfig: QConfig) -> None:
        """Places the activation quantizers (``self.planned``; pass 5 builds them) and builds the weight quantizers
        of weighted functions (F.conv2d, F.linear...)."""
        graph = gm.graph
        is_tensor: dict[fx.Node, bool] = {}
        origin: dict[fx.Node, str | None] = {}   # node -> quantizer whose grid its output lies on
        quantized_copy: dict[fx.Node, fx.Node] = {}  # node -> its fake-quantized version
        names = {n for n, _ in gm.named_modules()}
        self.planned = {}

        def new_name(base: str, suffix: str = "post_act_fake_quantizer") -> str:
            name, i = f"{base}_{suffix}", 1
            while name in names:
                name, i = f"{base}_{suffix}_{i}", i + 1
            names.add(name)
            return name

        def plan(base: str, bound: float | None = None) -> str:
            name = new_name(base)
            self.planned[name] = PlannedQuantizer(qconfig.a_scheme.per_channel, bound)
            return name

        def call_after(anchor: fx.Node, target: str, src: fx.Node) -> fx.Node:
            with graph.inserting_after(anchor):  # create_node: a planned target is not a submodule yet
                q = graph.create_node("call_module", target, (src,))
            is_tensor[q], origin[q] = True, target
            return q

        def quantize_input(a: fx.Node) -> fx.Node:
            if self._planned_call(a) or (a.op == "call_module" and isinstance(self._module(gm, a), QuantizeBase)):
                return a
            if a in quantized_copy:
                return quantized_copy[a]
            if origin.get(a):
                q = call_after(a, origin[a], a)   # same grid: re-use the producer's quantizer
            else:
                q = call_after(a, plan(a.name), a)
            quantized_copy[a] = q
            return q

        def quantize_weight(consumer: fx.Node, w: fx.Node, axis: int) -> fx.Node:
            param = gm.get_parameter(w.target) if w.op == "get_attr" else None
            channels = param.shape[axis] if param is not None else 1
            fq = qconfig.weight(channels=channels, ch_axis=axis)
            base = str(w.target).replace(".", "_") if w.op == "get_attr" else w.name
            name = new_name(base, "weight_fake_quantizer")
            gm.add_submodule(name, fq)
            with graph.inserting_before(consumer):
                q = graph.call_module(name, (w,))
            is_tensor[q], origin[q] = True, None
            return q

        weighted_fns = {torch.nn.functional.conv1d: 0, torch.nn.functional.conv2d: 0, torch.nn.functional.linear: 0,
                        torch.nn.functional.conv_transpose1d: 1, torch.nn.functional.conv_transpose2d: 1}

        for node in list(graph.nodes):
            is_tensor[node] = self._is_tensor(gm, node, is_tensor)
            if not is_tensor[node]:
                origin[node] = None
                continue
            treatment = self.classify(gm, node)
            tensor_inputs = [a for a in node.all_input_nodes if is_tensor.get(a, False)]
            if treatment == PASSTHROUGH and len(tensor_inputs) > 1 and not _roi_like(gm, node):
                treatment = QUANTIZED
            if treatment == PASSTHROUGH:
                origin[node] = origin.get(tensor_inputs[0]) if tensor_inputs else None
                if node.op == "call_function" and node.target is operator.getitem:
                    origin[node] = self._getitem_origin(node, origin)
                continue
            if treatment != QUANTIZED:
                origin[node] = None
                continue
            # quantized op: inputs ...
            w_axis = weighted_fns.get(node.target) if node.op == "call_function" else None
            for i, a in enumerate(_flat_node_args(node)):
                if not is_tensor.get(a, False):
                    continue
                if w_axis is not None and a is _arg(node, 1, "weight"):
                    node.replace_input_with(a, quantize_weight(node, a, w_axis))
                elif w_axis is not None and a is _arg(node, 2, "bias"):
                    continue  # biases stay float (int32 in the deployed kernel)
                else:
                    node.replace_input_with(a, quantize_input(a))
            mod = self._module(gm, node)
            if self._output_stays_float(gm, node):
                origin[node] = None
                continue
            # ... and output (after a directly following ReLU-like activation, which it absorbs)
            tail, bound = node, None
            if getattr(mod, "act", None) is not None:
                bound = self._act_bound(mod.act)
            while len(tail.users) == 1:
                (user,) = tail.users
                if not self._is_fusable_act(gm, user) or user.args[0] is not tail:
                    break
                tail = user
                bound = self._act_bound(self._module(gm, user) if user.op == "call_module" else user.target)
            q = call_after(tail, plan(tail.name, bound), tail)
            tail.replace_all_uses_with(q, delete_user_cb=lambda u: u is not q)
            quantized_copy[tail] = q
            origin[node] = origin[tail] = origin[q]

    # -- pass 4: one grid per concatenation ---------------------------------------------------------
    def share_concat_scales(self, gm: fx.GraphModule) -> None:
        """Each quantized torch.cat's input and output quantizers become one module, called at every site, so
        calibration sees all of them and QAT learns one scale. Concats that share a quantizer (an input feeding
        two concats, a concat of concats) end up in one group. Inputs on no activation grid (integers, weights,
        per-channel quantizers) keep their own."""
        parent: dict[str, str] = {}

        def find(name: str) -> str:
            while parent.setdefault(name, name) != name:
                parent[name] = parent[parent[name]]
                name = parent[name]
            return name

        last_output: dict[str, str] = {}  # any member -> the output quantizer of the last concat joining it
        copies: set[str] = set()  # outputs of concats whose every input is in the group: no values of their own
        for node in gm.graph.nodes:
            row = self._row(gm, node) if node.op == "call_function" else None
            if row is None or row.name != "cat" or self.is_excluded(node):
                continue
            out = self._output_quantizer(gm, node)
            if out is None:  # the concat's output stays float: nothing to copy into
                continue
            members = [out] + [str(a.target) for a in node.all_input_nodes
                               if self._shareable(gm, a) and not self._known_integer(gm, a.args[0])]
            if len(members) == len(node.all_input_nodes) + 1:
                copies.add(out)
            for m in members[1:]:
                parent[find(m)] = find(out)
            for m in members:
                last_output[m] = out
        groups: dict[str, list[str]] = {}
        for name in parent:
            groups.setdefault(find(name), []).append(name)
        survivor_of: dict[str, str] = {}
        position = self._graph_position(gm)
        for members in groups.values():
            if len(members) < 2:
                continue
            # named after the concat that closes the group (the last in graph order), one of its own names
            survivor = max((last_output[m] for m in members), key=position.__getitem__)
            bounds = [self.planned[m].bound for m in members if m not in copies]
            # a bounded activation's cap (a Clip folded into QuantizeLinear) holds only if every source has one
            self.planned[survivor].bound = None if not bounds or any(b is None for b in bounds) else max(bounds)
            survivor_of.update({m: survivor for m in members if m != survivor})
            logger.debug("concat: %s share one quantizer, %s", sorted(members), survivor)
        if not survivor_of:
            return
        for node in gm.graph.nodes:
            if node.op == "call_module" and node.target in survivor_of:
                node.target = survivor_of[node.target]
        sites: dict[str, int] = {}
        for node in gm.graph.nodes:
            if node.op == "call_module":
                sites[str(node.target)] = sites.get(str(node.target), 0) + 1
        for survivor in set(survivor_of.values()):
            self.planned[survivor].shared_sites = sites[survivor]
        logger.info("shared concat scales: %d quantizers merged into %d", len(survivor_of) + len(
            set(survivor_of.values())), len(set(survivor_of.values())))

    # -- pass 5: build the activation quantizers --------------------------------------------------------
    def build_act_quantizers(self, gm: fx.GraphModule, qconfig: QConfig) -> None:
        """Each planned quantizer still called in the graph is built once: with the ``module_qconfig`` of a layer
        whose input or output it quantizes (quantization/overrides.py says which), else with ``qconfig``."""
        chosen = activation_qconfigs(gm, self.module_qconfig, self._quantized_layers(gm), self._planned_call)
        called = {str(n.target) for n in gm.graph.nodes if n.op == "call_module"}
        for name, plan in self.planned.items():
            if name not in called:  # merged into a concatenation's shared quantizer (pass 4)
                continue
            fq = chosen.get(name, qconfig).activation()
            if plan.bound is not None and not fq.scheme.signed:
                fq.max_scale = plan.bound / (fq.quant_max - fq.quant_min)
            fq.shared_sites = plan.shared_sites
            gm.add_submodule(name, fq)
        self.planned = {}

    # -- pass 6: each layer's input quantizer ---------------------------------------------------------
    def link_input_quantizers(self, gm: fx.GraphModule) -> None:
        """A QAT layer's int32 bias lives on the grid input scale x weight scale (nn/qat: deployed_bias): each layer
        called on a quantized input gets that quantizer as ``input_fake_quant``."""
        for node in gm.graph.nodes:
            layer = self._module(gm, node)
            if isinstance(layer, QATMixin) and node.args and isinstance(node.args[0], fx.Node):
                fq = self._module(gm, node.args[0])
                if isinstance(fq, QuantizeBase):
                    layer.link_input_quantizer(fq)

    @staticmethod
    def _graph_position(gm: fx.GraphModule) -> dict[str, int]:
        """Quantizer name -> position of its first call in the graph."""
        pos: dict[str, int] = {}
        for i, node in enumerate(gm.graph.nodes):
            if node.op == "call_module":
                pos.setdefault(str(node.target), i)
        return pos

    def _shareable(self, gm: fx.GraphModule, node: fx.Node) -> bool:
        """A call of a planned per-tensor activation quantizer."""
        name = self._planned_call(node)
        return name is not None and not self.planned[name].per_channel

    def _output_quantizer(self, gm: fx.GraphModule, node: fx.Node) -> str | None:
        """The quantizer of a node's output, past a ReLU-like activation it absorbs; None when it stays float."""
        cur = node
        while True:
            users = list(cur.users)
            for u in users:
                if self._shareable(gm, u) and u.args[0] is cur:
                    return str(u.target)
            if len(users) != 1 or not self._is_fusable_act(gm, users[0]) or users[0].args[0] is not cur:
                return None
            cur = users[0]

    def _known_integer(self, gm: fx.GraphModule, node) -> bool:
        """Integer by construction (argmax, the indices of max / topk): its quantizer never sees a float."""
        if not isinstance(node, fx.Node):
            return False
        if self.classify(gm, node) == INDEX:
            return True
        return node.op == "call_function" and node.target is operator.getitem and _selects_indices(node)

    @staticmethod
    def _getitem_origin(node: fx.Node, origin) -> str | None:
        src = node.args[0]
        if _selects_indices(node):
            return None
        return origin.get(src) if isinstance(src, fx.Node) else None

    def _is_tensor(self, gm, node: fx.Node, is_tensor: dict) -> bool:
        if node.op == "output":
            return False
        if node.op in ("placeholder", "get_attr"):
            return True
        if node.op == "call_function":
            if node.target in SHAPE_FUNCTIONS:
                return False
            if node.target is operator.getitem:
                src = node.args[0]
                return isinstance(src, fx.Node) and is_tensor.get(src, False)
            if getattr(node.target, "__module__", None) == "_operator":
                return any(is_tensor.get(a, False) for a in node.all_input_nodes)
            return True
        if node.op == "call_method":
            return node.target not in SHAPE_METHODS
        return True  # call_module


def _selects_indices(getitem: fx.Node) -> bool:
    """``torch.max(x, dim)[1]`` and the like: the integer half of a (values, indices) result."""
    src, idx = getitem.args[0], getitem.args[1]
    if isinstance(src, fx.Node) and src.op in ("call_function", "call_method"):
        return getattr(src.target, "__name__", src.target) in ("min", "max", "topk", "sort") and idx != 0
    return False


def _roi_like(gm, node) -> bool:
    # RoIPool takes (features, boxes): only the features carry a grid
    row = (OP_INDEX.lookup_module(gm.get_submodule(node.target)) if node.op == "call_module"
           else OP_INDEX.functions.get(node.target))
    return row is not None and row.name == "RoIPool"


def _arg(node: fx.Node, pos: int, name: str):
    if len(node.args) > pos:
        return node.args[pos]
    return node.kwargs.get(name)


def _flat_node_args(node: fx.Node) -> list[fx.Node]:
    out: list[fx.Node] = []
    fx.node.map_arg((node.args, node.kwargs), lambda n: out.append(n) or n)
    seen, uniq = set(), []
    for n in out:
        if n not in seen:
            seen.add(n)
            uniq.append(n)
    return uniq


def _set_module(gm: nn.Module, qualname: str, module: nn.Module) -> None:
    parent, _, name = qualname.rpartition(".")
    setattr(gm.get_submodule(parent) if parent else gm, name, module)
