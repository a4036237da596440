// The shared libicecache_client is made of the static client library's objects
// (cmake/IceCacheInstall.cmake); a target needs at least one source of its own.
