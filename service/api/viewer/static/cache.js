// The last session's CT and PET files, kept in the browser (IndexedDB) so that a reload of
// `#session=<id>` shows the images again: the API keeps only their preprocessed window.

function database() {
  return new Promise((resolve, reject) => {
    const request = indexedDB.open("icr-viewer", 1);
    request.onupgradeneeded = () => request.result.createObjectStore("images");
    request.onsuccess = () => resolve(request.result);
    request.onerror = () => reject(request.error);
  });
}

function done(request) {
  return new Promise((resolve, reject) => {
    request.onsuccess = () => resolve(request.result);
    request.onerror = () => reject(request.error);
  });
}

export async function cacheImages(sessionId, ct, pet) {
  const store = (await database()).transaction("images", "readwrite").objectStore("images");
  await done(store.clear()); // one session's files at a time
  await done(store.put({ ct, pet }, sessionId));
}

export async function cachedImages(sessionId) {
  const store = (await database()).transaction("images", "readonly").objectStore("images");
  return (await done(store.get(sessionId))) || null;
}
