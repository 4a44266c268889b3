// Dossier's pages: a few behaviours on top of server-rendered HTML.
//
// A page never changes anything itself: every change is a call to the JSON
// API (the same endpoints, rules and audit entries as any client), made here
// with the session cookie. Forms say what they call with data attributes:
//
//   data-api="METHOD /path"   the endpoint; `{id}` is filled from data-id
//   data-body="json|multipart|none"
//   data-done="reload"        on success, reload the page (it shows the change:
//                             the API answers only once the read models have it)
//   data-flash="text"         shown after that reload
//   data-confirm="text"       ask first, in the page's #confirm dialog
//   data-max-bytes, data-max-text   the upload limit, checked before sending
//   data-auto-submit          send as soon as a file is chosen or dropped
//
// Uploads go with XMLHttpRequest, which reports upload progress (fetch does
// not). Errors are said in words with their cause: too big (with the limit),
// network, server.
//
// Every command carries an Idempotency-Key (ADR 0017): a fresh one per chosen
// file and content, kept while the answer leaves the outcome open (no answer,
// a 5xx, a 409), so that sending the same file, edit, bundle or deletion
// again after a network error repeats the first answer instead of doing it
// twice.
'use strict';

(function () {
  const FLASH_KEY = 'dossier-flash';

  function say(box, text, kind) {
    if (!box) return;
    box.textContent = text;
    box.className = 'status' + (kind ? ' ' + kind : '');
  }

  function tooBig(limitText) {
    return 'File too big: the limit is ' + limitText +
      ' per file. Try compressing it or splitting it into smaller parts.';
  }

  // The words for a failed call: its cause, then what to do.
  function explain(answer) {
    const error = answer.body && answer.body.error ? answer.body.error : null;
    if (answer.status === 0) {
      return 'Network problem: Dossier could not be reached. Check your connection and try again.';
    }
    if (error && error.code === 'file_too_large') {
      return 'File too big: ' + error.message + '. Try compressing it or splitting it into smaller parts.';
    }
    if (error && error.code === 'portal_upload_disabled') {
      return 'Uploads are turned off: contact your service provider to ask how to send documents.';
    }
    if (answer.status >= 500) {
      return 'Server error (' + answer.status + '): ' +
        (error ? error.message : 'Dossier could not finish this') + '. Try again in a moment.';
    }
    if (error) {
      return error.message.charAt(0).toUpperCase() + error.message.slice(1) + '.';
    }
    return 'That did not work (HTTP ' + answer.status + ').';
  }

  // One call to the API; resolves with {status, body} (status 0: no answer).
  function call(method, url, body, contentType, onProgress, idempotencyKey) {
    return new Promise(function (resolve) {
      const xhr = new XMLHttpRequest();
      xhr.open(method, url);
      xhr.setRequestHeader('Accept', 'application/json');
      if (idempotencyKey) xhr.setRequestHeader('Idempotency-Key', idempotencyKey);
      if (contentType) xhr.setRequestHeader('Content-Type', contentType);
      if (onProgress && xhr.upload) {
        xhr.upload.addEventListener('progress', function (e) {
          if (e.lengthComputable) onProgress(e.loaded, e.total);
        });
      }
      xhr.addEventListener('load', function () {
        let parsed = null;
        try { parsed = xhr.responseText ? JSON.parse(xhr.responseText) : null; } catch (_) { parsed = null; }
        resolve({ status: xhr.status, body: parsed });
      });
      xhr.addEventListener('error', function () { resolve({ status: 0, body: null }); });
      xhr.addEventListener('abort', function () { resolve({ status: 0, body: null }); });
      xhr.send(body);
    });
  }

  function jsonOf(form) {
    const data = {};
    for (const el of form.elements) {
      if (!el.name || el.disabled) continue;
      if (el.dataset.type === 'bool') data[el.name] = el.checked;
      else if (el.type === 'checkbox' || el.type === 'radio') { if (el.checked) data[el.name] = el.value; }
      else data[el.name] = el.value;
    }
    return JSON.stringify(data);
  }

  function multipartOf(form, dropped) {
    const data = new FormData();
    for (const el of form.elements) {
      if (!el.name || el.disabled) continue;
      if (el.type === 'file') {
        const file = dropped || el.files[0];
        if (file) {
          // Its size first: a file of a size known up front streams into
          // the store as it arrives (CONTRACT.md, "Uploads").
          data.append('size', String(file.size));
          data.append(el.name, file, file.name);
        }
      } else if (el.type === 'checkbox' || el.type === 'radio') {
        if (el.checked) data.append(el.name, el.value);
      } else {
        data.append(el.name, el.value);
      }
    }
    return data;
  }

  function newKey() {
    if (window.crypto && crypto.randomUUID) return crypto.randomUUID();
    const bytes = crypto.getRandomValues(new Uint8Array(16));
    return Array.from(bytes, function (b) { return b.toString(16).padStart(2, '0'); }).join('');
  }

  // What the key of a command stands for: where it was sent from (a form, or
  // a page action such as 'bundle'), the file chosen (the very object the user
  // chose or dropped) and the rest of what it sends. The same send again
  // reuses the key while the outcome is open.
  const commandKeys = new Map();
  function commandKey(scope, file, content) {
    const known = commandKeys.get(scope);
    if (known && known.file === file && known.content === content) return known.key;
    const key = newKey();
    commandKeys.set(scope, { file: file, content: content, key: key });
    return key;
  }

  // An answer that settles a command ends its key: the next send is a new
  // command. No answer, a 5xx or a 409 leave the outcome open, and a retry
  // must reuse the key.
  function settle(scope, answer) {
    if (answer.status !== 0 && answer.status < 500 && answer.status !== 409) {
      commandKeys.delete(scope);
    }
  }

  // A command's content, for its key: the endpoint and the body (a form's
  // text fields; its file is compared as the object chosen).
  function contentOf(method, url, body) {
    if (body instanceof FormData) {
      const fields = [];
      body.forEach(function (value, name) { if (!(value instanceof Blob)) fields.push([name, value]); });
      return method + ' ' + url + ' ' + JSON.stringify(fields);
    }
    return method + ' ' + url + ' ' + (body || '');
  }

  // One command to the API with its Idempotency-Key (ADR 0017).
  async function command(scope, method, url, body, contentType, file, onProgress) {
    const key = commandKey(scope, file, contentOf(method, url, body));
    const answer = await call(method, url, body, contentType, onProgress, key);
    settle(scope, answer);
    return answer;
  }

  function chosenFile(form, dropped) {
    if (dropped) return dropped;
    const input = form.querySelector('input[type=file]');
    return input && input.files.length ? input.files[0] : null;
  }

  function afterSuccess(form, note) {
    if (form.dataset.done === 'reload') {
      sessionStorage.setItem(FLASH_KEY, note || form.dataset.flash || 'Done.');
      window.location.reload();
    }
  }

  // ------------------------------------------------------------- dialogs

  function ask(text, yesSelector, dialogId) {
    const dialog = document.getElementById(dialogId || 'confirm');
    if (!dialog) return Promise.resolve(window.confirm(text));
    dialog.querySelector('[data-confirm-text]').textContent = text;
    return new Promise(function (resolve) {
      const yes = dialog.querySelector(yesSelector || '[data-confirm-yes]');
      function finish(answer) {
        yes.removeEventListener('click', onYes);
        dialog.removeEventListener('close', onClose);
        if (dialog.open) dialog.close();
        resolve(answer);
      }
      function onYes() { finish(true); }
      function onClose() { finish(false); }
      yes.addEventListener('click', onYes);
      dialog.addEventListener('close', onClose);
      dialog.showModal();
      yes.focus();
    });
  }

  // ------------------------------------------------------------- API forms

  async function submitApi(form, dropped) {
    const parts = form.dataset.api.split(' ');
    const method = parts[0];
    const url = parts[1].replace('{id}', encodeURIComponent(form.dataset.id || ''));
    const status = form.querySelector('[data-status]');
    const progress = form.querySelector('[data-progress]');
    const file = chosenFile(form, dropped);
    const max = Number(form.dataset.maxBytes || 0);
    if (file && max && file.size > max) {
      say(status, tooBig(form.dataset.maxText || max + ' bytes'), 'error');
      return;
    }
    if (form.dataset.confirm && !(await ask(form.dataset.confirm))) return;

    let body = null;
    let type = null;
    if (form.dataset.body === 'json') { body = jsonOf(form); type = 'application/json'; }
    else if (form.dataset.body === 'multipart') { body = multipartOf(form, dropped); }

    const buttons = form.querySelectorAll('button');
    buttons.forEach(function (b) { b.disabled = true; });
    say(status, file ? 'Uploading ' + file.name + '…' : 'Working…', 'busy');
    if (progress && file) { progress.hidden = false; progress.value = 0; progress.max = 100; }
    const answer = await command(form, method, url, body, type, file, progress && file ? function (loaded, total) {
      progress.value = Math.round((loaded / total) * 100);
      say(status, 'Uploading ' + file.name + '… ' + progress.value + ' %', 'busy');
    } : null);
    buttons.forEach(function (b) { b.disabled = false; });
    if (answer.status >= 200 && answer.status < 300) {
      if (progress) progress.value = progress.max;
      say(status, form.dataset.flash || 'Done.', 'ok');
      form.dispatchEvent(new CustomEvent('dossier:done', { detail: answer.body }));
      afterSuccess(form);
    } else {
      if (progress) progress.hidden = true;
      say(status, explain(answer), 'error');
    }
  }

  function showChosen(form) {
    const out = form.querySelector('[data-chosen]');
    const file = chosenFile(form);
    if (out) out.textContent = file ? file.name : '';
    const name = form.querySelector('input[name=name]');
    if (file && name && !name.value) name.value = file.name.replace(/\.[^.]*$/, '');
  }

  function setUpForms() {
    document.querySelectorAll('form[data-api]').forEach(function (form) {
      form.addEventListener('submit', function (e) {
        e.preventDefault();
        submitApi(form);
      });
      form.querySelectorAll('input[type=file]').forEach(function (input) {
        input.addEventListener('change', function () {
          showChosen(form);
          if (form.hasAttribute('data-auto-submit') && input.files.length) submitApi(form);
        });
      });
    });
  }

  // ------------------------------------------------------------- dropping files

  function filesOf(e) {
    return e.dataTransfer && e.dataTransfer.files ? e.dataTransfer.files : [];
  }

  // A drop zone inside a form (the Add file window): the dropped file becomes
  // the form's file.
  function setUpDropZones() {
    document.querySelectorAll('[data-dropzone]').forEach(function (zone) {
      const form = zone.closest('form');
      const input = zone.querySelector('input[type=file]');
      ['dragenter', 'dragover'].forEach(function (type) {
        zone.addEventListener(type, function (e) { e.preventDefault(); zone.classList.add('over'); });
      });
      zone.addEventListener('dragleave', function () { zone.classList.remove('over'); });
      zone.addEventListener('drop', function (e) {
        e.preventDefault();
        zone.classList.remove('over');
        const files = filesOf(e);
        if (!files.length) return;
        try { input.files = files; } catch (_) { /* older browsers: keep the picker */ }
        showChosen(form);
      });
    });

    // A whole task window: dragging a file over it shows where to let go;
    // letting go uploads it to the task at once.
    document.querySelectorAll('[data-drop-target]').forEach(function (area) {
      const form = document.getElementById(area.dataset.dropTarget);
      const overlay = area.querySelector('[data-drop-overlay]');
      let depth = 0;
      area.addEventListener('dragenter', function (e) {
        e.preventDefault();
        depth += 1;
        if (overlay) overlay.hidden = false;
      });
      area.addEventListener('dragover', function (e) { e.preventDefault(); });
      area.addEventListener('dragleave', function () {
        depth = Math.max(0, depth - 1);
        if (depth === 0 && overlay) overlay.hidden = true;
      });
      area.addEventListener('drop', function (e) {
        e.preventDefault();
        depth = 0;
        if (overlay) overlay.hidden = true;
        const files = filesOf(e);
        if (files.length && form) submitApi(form, files[0]);
      });
    });
  }

  // ------------------------------------------------------------- dialogs and editing

  function setUpDialogs() {
    document.querySelectorAll('[data-open]').forEach(function (button) {
      button.addEventListener('click', function () {
        const dialog = document.getElementById(button.dataset.open);
        dialog.showModal();
        const first = dialog.querySelector('input:not([type=hidden]), select, textarea');
        if (first) first.focus();
      });
    });
    document.querySelectorAll('[data-close]').forEach(function (button) {
      button.addEventListener('click', function () { button.closest('dialog').close(); });
    });
    document.querySelectorAll('[data-edit]').forEach(function (button) {
      button.addEventListener('click', function () {
        const dialog = document.getElementById('edit-file');
        const form = dialog.querySelector('form');
        form.dataset.id = button.dataset.edit;
        form.querySelector('[name=name]').value = button.dataset.name;
        form.querySelector('[name=visibility]').value = button.dataset.visibility;
        say(form.querySelector('[data-status]'), '', '');
        dialog.showModal();
        form.querySelector('[name=name]').focus();
      });
    });
  }

  // ------------------------------------------------------------- selection: ZIP and delete

  function plural(n, one, many) { return n + ' ' + (n === 1 ? one : many); }

  function setUpSelection() {
    const bar = document.querySelector('[data-selection-for]');
    if (!bar) return;
    const table = document.getElementById(bar.dataset.selectionFor);
    const boxes = table ? Array.from(table.querySelectorAll('input[name=file_id]')) : [];
    const all = table ? table.querySelector('[data-select-all]') : null;
    const download = bar.querySelector('[data-bulk=download]');
    const remove = bar.querySelector('[data-bulk=delete]');
    const count = bar.querySelector('[data-selected-count]');
    const why = bar.querySelector('[data-delete-why]');
    const status = document.getElementById('bulk-status');
    const progress = document.querySelector('[data-bundle-progress]');

    function selected() { return boxes.filter(function (b) { return b.checked; }); }
    function deletable() { return selected().filter(function (b) { return !b.hasAttribute('data-protected'); }); }

    function refresh() {
      const chosen = selected();
      const protectedOnes = chosen.length - deletable().length;
      count.textContent = chosen.length ? plural(chosen.length, 'file', 'files') + ' selected' : 'No file selected';
      download.disabled = chosen.length === 0;
      remove.disabled = deletable().length === 0;
      why.hidden = protectedOnes === 0;
      if (all) {
        all.checked = chosen.length > 0 && chosen.length === boxes.length;
        all.indeterminate = chosen.length > 0 && chosen.length < boxes.length;
      }
    }
    boxes.forEach(function (b) { b.addEventListener('change', refresh); });
    if (all) {
      all.addEventListener('change', function () {
        boxes.forEach(function (b) { b.checked = all.checked; });
        refresh();
      });
    }

    download.addEventListener('click', async function () {
      const ids = selected().map(function (b) { return b.value; });
      if (ids.length === 1) {
        window.location.href = '/v1/files/' + encodeURIComponent(ids[0]) + '/content';
        return;
      }
      download.disabled = true;
      say(status, 'Preparing a ZIP of ' + ids.length + ' files…', 'busy');
      const started = await command('bundle', 'POST', '/v1/bundles', JSON.stringify({ file_ids: ids }), 'application/json');
      if (started.status !== 202) {
        download.disabled = false;
        say(status, explain(started), 'error');
        return;
      }
      const id = started.body.id;
      progress.hidden = false;
      progress.max = ids.length;
      progress.value = 0;
      for (;;) {
        const state = await call('GET', '/v1/bundles/' + encodeURIComponent(id));
        if (state.status !== 200) { say(status, explain(state), 'error'); break; }
        progress.max = state.body.file_count;
        progress.value = state.body.files_done;
        if (state.body.status === 'ready') {
          say(status, 'ZIP of ' + plural(state.body.file_count, 'file', 'files') + ' ready: downloading.', 'ok');
          window.location.href = '/v1/bundles/' + encodeURIComponent(id) + '/content';
          break;
        }
        if (state.body.status === 'failed') {
          say(status, 'The ZIP could not be made: ' + (state.body.error || 'unknown cause') + '.', 'error');
          break;
        }
        say(status, 'Preparing ZIP: ' + state.body.files_done + ' of ' + state.body.file_count + ' files…', 'busy');
        await new Promise(function (r) { setTimeout(r, 400); });
      }
      download.disabled = false;
    });

    remove.addEventListener('click', async function () {
      const ids = deletable().map(function (b) { return b.value; });
      const kept = selected().length - ids.length;
      let text = 'Delete ' + plural(ids.length, 'file', 'files') + ' permanently?';
      if (kept) text += ' ' + plural(kept, 'protected file stays', 'protected files stay') + ': system and product files cannot be deleted.';
      if (!(await ask(text, '[data-confirm-delete]', 'confirm-delete'))) return;
      say(status, 'Deleting…', 'busy');
      const answer = await command('bulk-delete', 'POST', '/v1/files/delete', JSON.stringify({ file_ids: ids, confirm: true }), 'application/json');
      if (answer.status !== 200) { say(status, explain(answer), 'error'); return; }
      const done = answer.body.results.filter(function (r) { return r.status === 'deleted'; }).length;
      const refused = answer.body.results.length - done;
      let note = 'Deleted ' + plural(done, 'file', 'files') + '.';
      if (refused) note += ' ' + plural(refused, 'file was', 'files were') + ' not deleted (protected or already gone).';
      sessionStorage.setItem(FLASH_KEY, note);
      window.location.reload();
    });
    refresh();
  }

  function showFlash() {
    const text = sessionStorage.getItem(FLASH_KEY);
    sessionStorage.removeItem(FLASH_KEY);
    const box = document.getElementById('flash');
    if (text && box) { box.textContent = text; box.hidden = false; }
  }

  document.addEventListener('DOMContentLoaded', function () {
    showFlash();
    setUpForms();
    setUpDropZones();
    setUpDialogs();
    setUpSelection();
  });
})();
