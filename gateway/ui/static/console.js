/* fedgate console (docs/ui.md): htmx glue — the viewer's sign-in token on every request, errors in words,
   loading state, charts (vega-embed), and the cohort builder's form → cohort JSON (what `fedgate query` takes). */
(function () {
  'use strict';
  var cfg = window.FEDGATE_UI || {};
  var tokenKey = cfg.tokenKey || 'fedgate.token';

  function toLogin() {
    sessionStorage.removeItem(tokenKey);
    location.assign(cfg.login + '?next=' + encodeURIComponent(location.pathname + location.search));
  }

  function showError(text) {
    var box = document.getElementById('error');
    if (!box) return;
    box.textContent = text;
    box.hidden = !text;
    if (text) box.focus();
  }

  function claims() {
    var t = sessionStorage.getItem(tokenKey);
    if (!t) return null;
    try {
      var p = t.split('.')[1].replace(/-/g, '+').replace(/_/g, '/');
      return JSON.parse(atob(p + '==='.slice((p.length + 3) % 4)));
    } catch (e) { return null; }
  }

  function describePurpose(p) {
    if (!p) return 'no purpose in the token';
    if (p === 'treatment' || p.kind === 'treatment') return 'treatment';
    return 'research ' + (p.codes || []).concat(p.diseases || []).join(' ');
  }

  document.addEventListener('htmx:configRequest', function (ev) {
    var t = sessionStorage.getItem(tokenKey);
    if (t) ev.detail.headers['Authorization'] = 'Bearer ' + t;
    var form = ev.detail.elt.closest ? ev.detail.elt.closest('form') : null;
    var purpose = form && form.querySelector('[data-purpose]');
    if (purpose && purpose.value.trim()) ev.detail.headers['X-Purpose-Of-Use'] = purpose.value.trim();
    showError('');
  });

  document.addEventListener('htmx:beforeRequest', function (ev) {
    var target = ev.detail.target;
    if (target) target.setAttribute('aria-busy', 'true');
  });
  document.addEventListener('htmx:afterRequest', function (ev) {
    var target = ev.detail.target;
    if (target) target.removeAttribute('aria-busy');
  });

  document.addEventListener('htmx:responseError', function (ev) {
    var xhr = ev.detail.xhr;
    if (xhr.status === 401) { toLogin(); return; }
    var detail = '';
    try { var body = JSON.parse(xhr.responseText); detail = body.detail || body.title || ''; } catch (e) { detail = ''; }
    var what = {400: 'The request was not accepted', 403: 'You are not allowed to see this', 404: 'Not found',
                409: 'Conflict', 422: 'The request was not accepted', 503: 'A service is not available'}[xhr.status]
               || 'The gateway failed to answer';
    showError(what + ' (HTTP ' + xhr.status + ')' + (detail ? ': ' + detail : '.'));
    var target = ev.detail.target;
    if (target && target.querySelector('.htmx-indicator')) target.textContent = '';
  });
  document.addEventListener('htmx:sendError', function () {
    showError('The gateway could not be reached: check the connection and try again.');
  });
  document.addEventListener('htmx:timeout', function () {
    showError('The request took too long and was abandoned; try again or narrow the query.');
  });

  function renderCharts(root) {
    if (typeof window.vegaEmbed !== 'function') return;
    (root || document).querySelectorAll('[data-spec]').forEach(function (el) {
      if (el.dataset.rendered) return;
      el.dataset.rendered = '1';
      window.vegaEmbed(el, JSON.parse(el.dataset.spec), {actions: false, renderer: 'svg'}).then(function () {
        el.dataset.drawn = '1';
      }).catch(function (e) {
        el.textContent = 'The chart could not be drawn: ' + e.message + ' (the table shows the same figures).';
      });
    });
  }
  document.addEventListener('htmx:afterSettle', function (ev) {
    renderCharts(ev.detail.elt);
    var heading = ev.detail.elt.querySelector && ev.detail.elt.querySelector('h2[tabindex="-1"]');
    if (heading) heading.focus();
  });

  // ---------------------------------------------------------------------------------------- cohort builder
  function val(form, field) {
    var el = form.querySelector('[data-field="' + field + '"]');
    if (!el) return '';
    if (el.type === 'checkbox') return el.checked;
    return el.value.trim();
  }
  function num(form, field) {
    var v = val(form, field);
    return v === '' ? undefined : Number(v);
  }
  function range(form, prefix) {
    var r = {};
    var lo = num(form, prefix + '.min'), hi = num(form, prefix + '.max');
    if (lo !== undefined) r.min = lo;
    if (hi !== undefined) r.max = hi;
    return Object.keys(r).length ? r : null;
  }

  function buildRequest(form) {
    var all = [];
    if (val(form, 'sex')) all.push({sex: val(form, 'sex')});
    var age = range(form, 'age');
    if (age) all.push({age: age});
    if (val(form, 'condition.code')) {
      all.push({condition: {code: val(form, 'condition.code'), descendants: !!val(form, 'condition.descendants')}});
    }
    if (val(form, 'observation.code')) {
      var o = {code: val(form, 'observation.code')};
      var ov = range(form, 'observation.value');
      if (ov) o.value = ov;
      all.push({observation: o});
    }
    var img = {};
    ['modality', 'body_part', 'manufacturer'].forEach(function (k) { if (val(form, 'imaging.' + k)) img[k] = val(form, 'imaging.' + k); });
    var st = range(form, 'imaging.slice_thickness');
    if (st) img.slice_thickness = st;
    if (Object.keys(img).length) all.push({imaging: img});
    var items = [];
    if (val(form, 'sr.finding')) items.push({concept: 'DCM:121071', code: val(form, 'sr.finding')});
    if (val(form, 'sr.concept')) {
      var it = {concept: val(form, 'sr.concept')};
      var sv = range(form, 'sr');
      if (sv) it.value = sv;
      items.push(it);
    }
    if (items.length) all.push({sr: items.length > 1 ? {same: 'group', items: items} : {items: items}});
    var labels = val(form, 'seg.labels').split(',').map(function (s) { return s.trim(); }).filter(Boolean);
    if (labels.length) all.push({seg: {segments: labels.map(function (l) { return {label: l}; })}});
    var cohort = all.length === 1 ? all[0] : all.length ? {all: all} : {age: {min: 0}};
    var breakdowns = [], stats = [];
    form.querySelectorAll('[data-breakdown]').forEach(function (c) { if (c.checked) breakdowns.push(c.dataset.breakdown); });
    form.querySelectorAll('[data-stat]').forEach(function (c) { if (c.checked) stats.push(c.dataset.stat); });
    return {cohort: cohort, breakdowns: breakdowns, stats: stats};
  }

  var SAVED = 'fedgate.cohorts';
  function saved() {
    try { return JSON.parse(localStorage.getItem(SAVED) || '[]'); } catch (e) { return []; }
  }
  function store(list) { localStorage.setItem(SAVED, JSON.stringify(list)); }

  function setupCohort() {
    var form = document.getElementById('cohort-form');
    if (!form) return;
    var area = document.getElementById('cohort-json');
    var manual = false;
    function sync() { if (!manual) area.value = JSON.stringify(buildRequest(form), null, 2); }
    form.addEventListener('input', function (ev) {
      if (ev.target === area) { manual = true; return; }
      if (ev.target.closest('.actions')) return;
      manual = false; sync();
    });
    form.addEventListener('change', function (ev) {
      if (ev.target === area || ev.target.closest('.actions')) return;
      manual = false; sync();
    });
    form.addEventListener('htmx:validation:validate', function () {
      try { JSON.parse(area.value); area.setCustomValidity(''); }
      catch (e) { area.setCustomValidity('Not JSON: ' + e.message); document.getElementById('json-details').open = true; }
    });
    sync();

    var list = document.getElementById('saved-list');
    function draw() {
      list.textContent = '';
      var items = saved();
      if (!items.length) { var li = document.createElement('li'); li.textContent = 'None yet.'; list.appendChild(li); }
      items.forEach(function (item, i) {
        var li = document.createElement('li');
        var name = document.createElement('span');
        name.textContent = item.name + ' ';
        li.appendChild(name);
        [['Re-run', function () { area.value = item.json; manual = true; form.requestSubmit(); }],
         ['Load', function () { area.value = item.json; manual = true; document.getElementById('json-details').open = true; area.focus(); }],
         ['Delete', function () { var l = saved(); l.splice(i, 1); store(l); draw(); }]].forEach(function (b) {
          var btn = document.createElement('button');
          btn.type = 'button';
          btn.textContent = b[0];
          btn.setAttribute('aria-label', b[0] + ' ' + item.name);
          btn.addEventListener('click', b[1]);
          li.appendChild(btn);
        });
        list.appendChild(li);
      });
    }
    document.getElementById('save').addEventListener('click', function () {
      var name = document.getElementById('save-name').value.trim() || ('cohort ' + new Date().toISOString().slice(0, 16));
      var l = saved().filter(function (x) { return x.name !== name; });
      l.push({name: name, json: area.value});
      store(l); draw();
    });
    document.getElementById('export').addEventListener('click', function () {
      var name = (document.getElementById('save-name').value.trim() || 'cohort').replace(/[^A-Za-z0-9_-]+/g, '-');
      var a = document.createElement('a');
      a.href = URL.createObjectURL(new Blob([area.value + '\n'], {type: 'application/json'}));
      a.download = name + '.json';
      document.body.appendChild(a); a.click(); a.remove();
    });
    draw();
  }

  document.addEventListener('DOMContentLoaded', function () {
    var c = claims();
    var who = document.getElementById('whoami');
    if (who && c) who.textContent = 'Signed in as ' + c.sub + ' (' + (c.roles && c.roles.length ? c.roles.join(', ') + '; ' : '') + describePurpose(c.purpose) + ')';
    var out = document.getElementById('signout');
    if (out) out.addEventListener('click', toLogin);
    setupCohort();
    renderCharts(document);
  });
})();
