(function () {
  'use strict';
  var DATA = JSON.parse(document.getElementById('graph-data').textContent);
  var DIFF = DATA.diff;
  var views = {};
  var order = [];
  var selected = null;

  function el(tag, attrs) {
    var e = document.createElement(tag);
    if (attrs) Object.keys(attrs).forEach(function (k) {
      if (k === 'text') e.textContent = attrs[k]; else e.setAttribute(k, attrs[k]);
    });
    for (var i = 2; i < arguments.length; i++) {
      var c = arguments[i];
      if (c === null || c === undefined) continue;
      e.appendChild(typeof c === 'string' ? document.createTextNode(c) : c);
    }
    return e;
  }
  function dims(shape) {
    if (shape === null || shape === undefined) return '';
    return shape.length ? shape.join('\u00d7') : 'scalar';
  }
  function fmt(v) { return typeof v === 'string' ? v : JSON.stringify(v); }

  // ------------------------------------------------------------ views, pan and zoom
  document.querySelectorAll('svg.canvas').forEach(function (svg) {
    var name = svg.getAttribute('data-view');
    var v = { name: name, svg: svg, vp: svg.querySelector('.viewport'), x: 0, y: 0, k: 1,
      w: +svg.getAttribute('data-width'), h: +svg.getAttribute('data-height'),
      els: new Map(), pos: new Map(), hay: new Map(), data: DATA.views[name], fitted: false,
      rail: svg.parentNode.querySelector('.rail') };
    v.thumb = v.rail ? v.rail.querySelector('.thumb') : null;
    svg.querySelectorAll('g.node').forEach(function (g) {
      var id = g.getAttribute('data-id');
      var m = /translate\(([-\d.e]+),([-\d.e]+)\)/.exec(g.getAttribute('transform'));
      v.els.set(id, g);
      v.pos.set(id, [+m[1], +m[2]]);
      var n = v.data.nodes[id] || {};
      v.hay.set(id, [id, n.target, n.kind, n.module, n.module_type].join(' ').toLowerCase());
    });
    views[name] = v;
    order.push(name);
    setupPanZoom(v);
    setupRail(v);
  });

  function apply(v) {
    v.vp.setAttribute('transform', 'translate(' + v.x.toFixed(1) + ',' + v.y.toFixed(1) + ') scale(' + v.k.toFixed(4) + ')');
    if (v.thumb) {
      var r = v.svg.getBoundingClientRect();
      var top = Math.max(0, -v.y / v.k / v.h), bottom = Math.min(1, (r.height - v.y) / v.k / v.h);
      v.thumb.style.top = (100 * top).toFixed(2) + '%';
      v.thumb.style.height = (100 * Math.max(0.005, bottom - top)).toFixed(2) + '%';
    }
  }

  // Overview rail: where the changes, search hits and the selection are; click to jump.
  function setupRail(v) {
    if (!v.rail) return;
    var down = false;
    function jump(e) {
      var rr = v.rail.getBoundingClientRect(), r = v.svg.getBoundingClientRect();
      var gy = (e.clientY - rr.top) / rr.height * v.h;
      v.y = r.height / 2 - gy * v.k;
      apply(v);
    }
    v.rail.addEventListener('pointerdown', function (e) { down = true; jump(e); e.preventDefault(); });
    window.addEventListener('pointermove', function (e) { if (down) jump(e); });
    window.addEventListener('pointerup', function () { down = false; });
    drawRail(v);
  }
  function drawRail(v) {
    if (!v.rail) return;
    v.rail.querySelectorAll('.tick').forEach(function (t) { t.remove(); });
    var frag = document.createDocumentFragment();
    v.els.forEach(function (g, id) {
      var cls = null;
      if (g.classList.contains('sel')) cls = 'sel';
      else if (g.classList.contains('hit')) cls = 'hit';
      else if (v.data.nodes[id] && v.data.nodes[id].status !== 'kept') cls = v.data.nodes[id].status;
      if (!cls) return;
      var t = document.createElement('div');
      t.className = 'tick ' + cls;
      t.style.top = (100 * v.pos.get(id)[1] / v.h).toFixed(2) + '%';
      frag.appendChild(t);
    });
    v.rail.appendChild(frag);
  }
  function visible(v) { var r = v.svg.getBoundingClientRect(); return r.width > 0 && r.height > 0; }
  function visibleViews() { return order.map(function (n) { return views[n]; }).filter(visible); }

  // The smallest labels are 9-9.5px: below this zoom they drop under ~7px on screen.
  var MIN_ZOOM = 0.8;
  var PAD = 12;

  // What the drawing really covers: long edges bow out past data-width, badges and
  // notes poke out of their nodes. getBBox is in the viewport's own (unzoomed) units.
  function extent(v) {
    if (v.box) return v.box;
    var b = { x: 0, y: 0, w: v.w, h: v.h };
    try {
      var bb = v.vp.getBBox();
      if (bb.width && bb.height) {
        var x1 = Math.max(b.w, bb.x + bb.width), y1 = Math.max(b.h, bb.y + bb.height);
        b = { x: Math.min(0, bb.x), y: Math.min(0, bb.y) };
        b.w = x1 - b.x;
        b.h = y1 - b.y;
        v.box = b;  // a hidden pane measures 0: try again once it is shown
      }
    } catch (err) { /* not rendered yet */ }
    return b;
  }
  // The part of the pane the graph can use: the overview rail covers its right edge.
  function area(v) {
    var r = v.svg.getBoundingClientRect();
    var rail = v.rail ? v.rail.getBoundingClientRect().width : 0;
    return { w: Math.max(0, r.width - rail), h: r.height };
  }
  // The zoom a pane opens at: the whole drawing if it fits legibly, else its full width
  // if that does, else MIN_ZOOM (and the user pans); never above 1:1. whole: Fit.
  function fitZoom(v, whole) {
    var a = area(v), b = extent(v);
    var kw = (a.w - 2 * PAD) / b.w, kh = (a.h - 2 * PAD) / b.h;
    var k = Math.min(1, kw, kh);
    if (whole) return Math.max(0.03, k);
    return k >= MIN_ZOOM ? k : Math.max(MIN_ZOOM, Math.min(1, kw));
  }
  // Centre what fits; what does not starts at its top/left edge, so no node is cut off.
  function place(v, k) {
    var a = area(v), b = extent(v);
    v.k = k;
    v.x = b.w * k <= a.w ? (a.w - b.w * k) / 2 - b.x * k : PAD - b.x * k;
    v.y = b.h * k <= a.h ? (a.h - b.h * k) / 2 - b.y * k : PAD - b.y * k;
    v.fitted = true;
    apply(v);
  }
  function fit(v, whole) {
    var a = area(v);
    if (a.w && a.h) place(v, fitZoom(v, whole));
  }
  // Opening view: panes shown together share one zoom (the smallest any of them needs)
  // so before and after compare at one scale and open the same way.
  function fitTogether(list) {
    list = list.filter(function (v) { var a = area(v); return a.w && a.h; });
    if (!list.length) return;
    var k = Math.min.apply(null, list.map(function (v) { return fitZoom(v, false); }));
    list.forEach(function (v) { place(v, k); });
  }
  function zoomAt(v, factor, cx, cy) {
    var k = Math.max(0.03, Math.min(4, v.k * factor));
    v.x = cx - (cx - v.x) * (k / v.k);
    v.y = cy - (cy - v.y) * (k / v.k);
    v.k = k;
    apply(v);
  }
  function centerOn(v, id) {
    var p = v.pos.get(id);
    if (!p || !visible(v)) return;
    var r = v.svg.getBoundingClientRect();
    if (v.k < MIN_ZOOM) v.k = 1;
    v.x = r.width / 2 - p[0] * v.k;
    v.y = r.height / 2 - p[1] * v.k;
    apply(v);
  }

  function setupPanZoom(v) {
    var drag = null;
    v.svg.addEventListener('pointerdown', function (e) {
      if (e.button !== 0) return;
      var g = e.target.closest ? e.target.closest('g.node') : null;
      drag = { x: e.clientX, y: e.clientY, ox: v.x, oy: v.y, moved: false, node: g };
    });
    v.svg.addEventListener('pointermove', function (e) {
      if (!drag) return;
      var dx = e.clientX - drag.x, dy = e.clientY - drag.y;
      if (!drag.moved && Math.abs(dx) + Math.abs(dy) > 3) {
        drag.moved = true;
        v.svg.classList.add('dragging');
        if (v.svg.setPointerCapture) { try { v.svg.setPointerCapture(e.pointerId); } catch (err) { /* ignore */ } }
      }
      if (drag.moved) { v.x = drag.ox + dx; v.y = drag.oy + dy; apply(v); }
    });
    function end() {
      if (drag && !drag.moved && drag.node) select(v.name, drag.node.getAttribute('data-id'), false);
      drag = null;
      v.svg.classList.remove('dragging');
    }
    v.svg.addEventListener('pointerup', end);
    v.svg.addEventListener('pointercancel', function () { drag = null; v.svg.classList.remove('dragging'); });
    v.svg.addEventListener('wheel', function (e) {
      e.preventDefault();
      var unit = e.deltaMode === 1 ? 16 : (e.deltaMode === 2 ? 400 : 1);
      if (e.ctrlKey || e.metaKey) {
        var r = v.svg.getBoundingClientRect();
        zoomAt(v, Math.exp(-e.deltaY * unit * 0.002), e.clientX - r.left, e.clientY - r.top);
      } else {
        v.x -= (e.shiftKey ? e.deltaY : e.deltaX) * unit;
        if (!e.shiftKey) v.y -= e.deltaY * unit;
        apply(v);
      }
    }, { passive: false });
  }

  // ------------------------------------------------------------ selection and details
  function clearSelection() {
    document.querySelectorAll('g.node.sel').forEach(function (g) { g.classList.remove('sel'); });
    document.querySelectorAll('path.edge.hl').forEach(function (p) { p.classList.remove('hl'); });
  }
  function mark(v, id) {
    var g = v.els.get(id);
    if (!g) return;
    g.classList.add('sel');
    var q = CSS.escape(id);
    v.svg.querySelectorAll('path[data-src="' + q + '"],path[data-dst="' + q + '"]').forEach(function (p) {
      p.classList.add('hl');
    });
  }
  function partnerOf(view, id) {
    if (!DIFF) return null;
    var other = view === 'after' ? 'before' : 'after';
    var pid = DIFF.partner[view][id];
    return pid ? [other, pid] : null;
  }
  function select(view, id, center) {
    var v = views[view];
    if (!v || !v.els.has(id)) return;
    clearSelection();
    selected = [view, id];
    mark(v, id);
    if (center) centerOn(v, id);
    var p = partnerOf(view, id);
    if (p && views[p[0]]) {
      mark(views[p[0]], p[1]);
      centerOn(views[p[0]], p[1]);
    } else if (DIFF) {
      // No counterpart (added or removed): show where it would be in the other graph.
      var n = v.data.nodes[id];
      var near = n.args.concat(n.users).map(function (a) { return partnerOf(view, a); })
        .filter(function (q) { return q && views[q[0]] && views[q[0]].els.has(q[1]); })[0];
      if (near) centerOn(views[near[0]], near[1]);
    }
    showDetails(view, id);
    order.forEach(function (n) { drawRail(views[n]); });
  }

  function nodeLinks(view, ids) {
    var v = views[view];
    var box = el('span', { class: 'links' });
    ids.forEach(function (a) {
      if (!v.data.nodes[a]) return;
      var link = el('a', { href: '#', text: a });
      link.addEventListener('click', function (e) { e.preventDefault(); select(view, a, true); });
      box.appendChild(link);
    });
    return box.childNodes.length ? box : el('span', { class: 'muted', text: '—' });
  }

  function showDetails(view, id) {
    var v = views[view];
    var n = v.data.nodes[id];
    var box = document.getElementById('details');
    var title = n.op === 'call_function' ? n.target : (n.op === 'placeholder' ? 'input ' + n.id : n.op);
    var h = el('h2', null, title);
    if (DIFF) h.appendChild(el('span', { class: 'status ' + n.status, text: n.status }));
    var dl = el('dl');
    function row(k, val) {
      if (val === null || val === undefined || val === '') return;
      dl.appendChild(el('dt', { text: k }));
      dl.appendChild(el('dd', null, val));
    }
    row('name', n.id);
    if (DIFF) row('graph', view);
    row('op', n.op);
    row('kind', n.kind);
    row('module', n.module || '(root)');
    row('module type', n.module_type);
    row('shape', n.shape ? '[' + n.shape.join(', ') + ']' : '');
    row('dtype', n.dtype);
    var weights = n.args.filter(function (a) { return v.data.weights[a]; });
    row('inputs', nodeLinks(view, n.args));
    row('users', nodeLinks(view, n.users));
    if (weights.length) {
      var wl = el('div');
      weights.forEach(function (a) {
        var w = v.data.weights[a];
        wl.appendChild(el('div', null, el('code', { text: w.attr_path || a }), ' ' + dims(w.shape) + ' ',
          el('span', { class: 'muted', text: '(' + (w.params || 0).toLocaleString() + ')' })));
      });
      row('weights', wl);
    }
    var attrs = Object.keys(n.attrs || {});
    if (attrs.length) {
      var al = el('div');
      attrs.forEach(function (k) { al.appendChild(el('div', null, el('span', { class: 'muted', text: k + ' = ' }), n.attrs[k])); });
      row('attrs', al);
    }
    var notes = Object.keys(n.annotations || {});
    if (notes.length) {
      var nl = el('div');
      notes.forEach(function (k) { nl.appendChild(el('div', null, el('span', { class: 'muted', text: k + ': ' }), fmt(n.annotations[k]))); });
      row('annotations', nl);
    }
    if (DIFF) {
      var p = partnerOf(view, id);
      if (p) {
        var link = el('a', { href: '#', text: p[1] + ' (' + p[0] + ')' });
        link.addEventListener('click', function (e) { e.preventDefault(); select(p[0], p[1], true); });
        row('matches', link);
      }
      var ch = DIFF.changes[view === 'after' ? id : (p ? p[1] : '')];
      if (ch) {
        var cl = el('div');
        Object.keys(ch).forEach(function (f) {
          var a = ch[f][0], b = ch[f][1];
          var isObj = function (o) { return o && typeof o === 'object' && !Array.isArray(o); };
          if (isObj(a) && isObj(b)) {  // attrs / annotations: only the keys that differ
            Object.keys(Object.assign({}, a, b)).forEach(function (k) {
              if (fmt(a[k]) === fmt(b[k])) return;
              cl.appendChild(el('div', null, el('span', { class: 'muted', text: f + '.' + k + ': ' }),
                (k in a ? fmt(a[k]) : '\u2014') + ' \u2192 ' + (k in b ? fmt(b[k]) : '\u2014')));
            });
          } else {
            var show = function (v) { return Array.isArray(v) ? '[' + v.join(', ') + ']' : fmt(v); };
            cl.appendChild(el('div', null, el('span', { class: 'muted', text: f + ': ' }), show(a) + ' \u2192 ' + show(b)));
          }
        });
        row('changed', cl);
      }
    }
    if (n.stack_trace) row('stack trace', el('pre', { text: n.stack_trace }));
    box.replaceChildren(h, dl);
  }

  // ------------------------------------------------------------ search
  var search = document.getElementById('search');
  var matches = document.getElementById('matches');
  var hits = [];
  var hitIndex = -1;
  function runSearch() {
    var q = search.value.trim().toLowerCase();
    hits = [];
    hitIndex = -1;
    var counts = [];
    order.forEach(function (name) {
      var v = views[name];
      var c = 0;
      v.els.forEach(function (g, id) {
        var ok = !q || v.hay.get(id).indexOf(q) >= 0;
        g.classList.toggle('dim', !!q && !ok);
        g.classList.toggle('hit', !!q && ok);
        if (q && ok) { c++; hits.push([name, id]); }
      });
      counts.push(c);
    });
    order.forEach(function (n) { drawRail(views[n]); });
    matches.textContent = q ? (order.length > 1 ? counts.join(' / ') + ' matches (before / after)' : counts[0] + ' matches') : '';
  }
  function nextHit(step) {
    var vis = visibleViews().map(function (v) { return v.name; });
    var pool = hits.filter(function (h) { return vis.indexOf(h[0]) >= 0; });
    if (!pool.length) return;
    hitIndex = (hitIndex + step + pool.length) % pool.length;
    select(pool[hitIndex][0], pool[hitIndex][1], true);
  }
  search.addEventListener('input', runSearch);
  search.addEventListener('keydown', function (e) {
    if (e.key === 'Enter') { e.preventDefault(); nextHit(e.shiftKey ? -1 : 1); }
    if (e.key === 'Escape') { search.value = ''; runSearch(); }
  });
  document.querySelectorAll('a.op-link').forEach(function (a) {
    a.addEventListener('click', function (e) {
      e.preventDefault();
      search.value = a.getAttribute('data-q');
      runSearch();
      nextHit(1);
    });
  });

  // ------------------------------------------------------------ toolbar
  function each(fn) { visibleViews().forEach(fn); }
  function zoomCenter(f) {
    each(function (v) { var r = v.svg.getBoundingClientRect(); zoomAt(v, f, r.width / 2, r.height / 2); });
  }
  document.getElementById('zoom-in').addEventListener('click', function () { zoomCenter(1.25); });
  document.getElementById('zoom-out').addEventListener('click', function () { zoomCenter(0.8); });
  document.getElementById('zoom-fit').addEventListener('click', function () { each(function (v) { fit(v, true); }); });
  document.getElementById('zoom-1').addEventListener('click', function () {
    each(function (v) {
      var r = v.svg.getBoundingClientRect();
      zoomAt(v, 1 / v.k, r.width / 2, r.height / 2);
    });
  });
  // Next / previous change (diff only): added and changed nodes of the new graph, removed
  // ones of the old, in drawing order (relative height, as the two layouts differ).
  var changeIndex = -1;
  function stepChange(step) {
    var list = [];
    visibleViews().forEach(function (v) {
      v.els.forEach(function (g, id) {
        var st = v.data.nodes[id] && v.data.nodes[id].status;
        var wanted = v.name === 'after' ? (st === 'added' || st === 'changed')
          : (st === 'removed' || (st === 'changed' && !visible(views.after || v)));
        if (wanted) list.push([v.pos.get(id)[1] / v.h, v.name, id]);
      });
    });
    if (!list.length) return;
    list.sort(function (a, b) { return a[0] - b[0]; });
    changeIndex = (changeIndex + step + list.length) % list.length;
    select(list[changeIndex][1], list[changeIndex][2], true);
  }
  var nextChange = document.getElementById('next-change');
  if (nextChange) {
    nextChange.addEventListener('click', function () { stepChange(1); });
    document.getElementById('prev-change').addEventListener('click', function () { stepChange(-1); });
  }

  var mode = document.getElementById('mode');
  if (mode) {
    mode.querySelectorAll('button').forEach(function (b) {
      b.addEventListener('click', function () {
        document.body.className = 'mode-' + b.getAttribute('data-mode');
        mode.querySelectorAll('button').forEach(function (o) { o.classList.toggle('on', o === b); });
        fitTogether(visibleViews().filter(function (v) { return !v.fitted; }));
        if (selected) { var v = views[selected[0]]; if (visible(v)) centerOn(v, selected[1]); }
      });
    });
  }
  window.addEventListener('keydown', function (e) {
    if (e.target === search) return;
    if (e.key === '/') { e.preventDefault(); search.focus(); }
    if (e.key === 'f') each(function (v) { fit(v, true); });
    if ((e.key === 'n' || e.key === 'N') && nextChange) stepChange(e.shiftKey ? -1 : 1);
  });

  fitTogether(visibleViews());
  document.documentElement.setAttribute('data-ready', '1');
})();
