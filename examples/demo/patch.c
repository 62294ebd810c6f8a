/* The live patch of `relive demo`: replaces greeting() of the sample service (service.c).
 * Build: cc -O2 -fPIC -shared -o demo-patch.so patch.c
 * The manifest (DESIGN §4.9, format in crates/elf/src/manifest.rs) names the patch, the object
 * ("exe": the main executable, unpinned so that the demo's run-time build matches) and the function.
 */
__attribute__((used, section(".relive_manifest"))) static const char relive_manifest[] =
    "relive-manifest/1\n"
    "patch name=demo-greeting replace=0 stacking=0\n"
    "object name=exe\n"
    "func object=exe old=greeting sympos=0 new=greeting_v2\n";

const char *greeting_v2(long request) {
    (void)request;
    return "hello from the live patch";
}
