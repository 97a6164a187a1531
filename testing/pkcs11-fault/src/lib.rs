//! A PKCS#11 module for tests only. It forwards every call to a real module
//! (SoftHSM2 by default) and injects the faults SoftHSM2 cannot produce: a
//! PIN on its final try, a locked PIN, and a token that goes away.
//!
//! The fault is read on every call from the file named by
//! `KEYHOLDER_FAULT_FILE`: empty (or no file) for none, `final-try`,
//! `pin-locked`, `removed`, or a key generation the token refuses:
//! `keygen-unsupported` (CKR_FUNCTION_NOT_SUPPORTED, as OpenSC's PIV driver
//! answers) or `keygen-general-error` (CKR_GENERAL_ERROR, as tpm2-pkcs11
//! answers a template it cannot make). `KEYHOLDER_FAULT_MODULE` names the real module
//! (default `/usr/lib/softhsm/libsofthsm2.so`); everything not patched here,
//! `C_Initialize` and its arguments included, goes to it unchanged.
//!
//! When `KEYHOLDER_COUNT_FILE` is set, each call of the functions in
//! [`COUNTED`] appends one line with the function's name to that file
//! (forwarded unchanged otherwise), so a benchmark can count the token
//! operations a daemon request makes (`benches/unlock.rs`).
//!
//! FFI needs `unsafe`; it is confined to this test crate, which Keyholder
//! itself never links.

use std::io::Write;
use std::sync::OnceLock;

use cryptoki_sys::{
    CK_ATTRIBUTE_PTR, CK_BBOOL, CK_BYTE_PTR, CK_FLAGS, CK_FUNCTION_LIST, CK_FUNCTION_LIST_PTR_PTR,
    CK_MECHANISM_PTR, CK_NOTIFY, CK_OBJECT_HANDLE, CK_OBJECT_HANDLE_PTR, CK_RV, CK_SESSION_HANDLE,
    CK_SESSION_INFO_PTR, CK_SLOT_ID, CK_SLOT_ID_PTR, CK_TOKEN_INFO_PTR, CK_ULONG, CK_USER_TYPE,
    CKF_USER_PIN_COUNT_LOW, CKF_USER_PIN_FINAL_TRY, CKF_USER_PIN_LOCKED, CKR_DEVICE_REMOVED,
    CKR_FUNCTION_NOT_SUPPORTED, CKR_GENERAL_ERROR, CKR_OK, CKR_PIN_LOCKED, CKR_TOKEN_NOT_PRESENT,
};

struct Forward {
    /// Kept loaded for the life of the process.
    _library: libloading::Library,
    /// The real module's function list.
    real: CK_FUNCTION_LIST,
    /// The list handed out: the real one with some entries replaced.
    patched: Box<CK_FUNCTION_LIST>,
}

static FORWARD: OnceLock<Result<Forward, String>> = OnceLock::new();

#[derive(PartialEq, Eq)]
enum Fault {
    None,
    FinalTry,
    PinLocked,
    Removed,
    KeygenUnsupported,
    KeygenGeneralError,
}

fn fault() -> Fault {
    let Some(path) = std::env::var_os("KEYHOLDER_FAULT_FILE") else {
        return Fault::None;
    };
    match std::fs::read_to_string(path).unwrap_or_default().trim() {
        "final-try" => Fault::FinalTry,
        "pin-locked" => Fault::PinLocked,
        "removed" => Fault::Removed,
        "keygen-unsupported" => Fault::KeygenUnsupported,
        "keygen-general-error" => Fault::KeygenGeneralError,
        _ => Fault::None,
    }
}

fn load() -> Result<Forward, String> {
    let path = std::env::var("KEYHOLDER_FAULT_MODULE")
        .unwrap_or_else(|_| "/usr/lib/softhsm/libsofthsm2.so".into());
    // SAFETY: loading a PKCS#11 module runs its initialisers; the test
    // harness names a trusted module (SoftHSM2).
    let library = unsafe { libloading::Library::new(&path) }.map_err(|e| e.to_string())?;
    // SAFETY: the symbol has the C_GetFunctionList signature in every PKCS#11 module.
    let get: libloading::Symbol<'_, unsafe extern "C" fn(CK_FUNCTION_LIST_PTR_PTR) -> CK_RV> =
        unsafe { library.get(b"C_GetFunctionList\0") }.map_err(|e| e.to_string())?;
    let mut list: *mut CK_FUNCTION_LIST = std::ptr::null_mut();
    // SAFETY: `list` is a valid out-pointer.
    let rv = unsafe { get(&mut list) };
    if rv != CKR_OK || list.is_null() {
        return Err(format!("C_GetFunctionList of {path} failed: {rv}"));
    }
    // SAFETY: on CKR_OK the module returned a pointer to its function list,
    // which lives as long as the library stays loaded (we keep it loaded).
    let real = unsafe { *list };
    let mut patched = Box::new(real);
    patched.C_GetTokenInfo = Some(get_token_info);
    patched.C_GetSessionInfo = Some(get_session_info);
    patched.C_Login = Some(login);
    patched.C_GenerateKeyPair = Some(generate_key_pair);
    if count_file().is_some() {
        patched.C_GetSlotList = Some(get_slot_list);
        patched.C_OpenSession = Some(open_session);
        patched.C_CloseSession = Some(close_session);
        patched.C_Logout = Some(logout);
        patched.C_FindObjectsInit = Some(find_objects_init);
        patched.C_FindObjects = Some(find_objects);
        patched.C_FindObjectsFinal = Some(find_objects_final);
        patched.C_GetAttributeValue = Some(get_attribute_value);
        patched.C_SetAttributeValue = Some(set_attribute_value);
        patched.C_CreateObject = Some(create_object);
        patched.C_DestroyObject = Some(destroy_object);
        patched.C_DeriveKey = Some(derive_key);
        patched.C_SignInit = Some(sign_init);
        patched.C_Sign = Some(sign);
    }
    Ok(Forward {
        _library: library,
        real,
        patched,
    })
}

fn forward() -> Option<&'static Forward> {
    FORWARD.get_or_init(load).as_ref().ok()
}

/// The module's entry point.
///
/// # Safety
/// `list` must be a valid pointer to write a function-list pointer to.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn C_GetFunctionList(list: CK_FUNCTION_LIST_PTR_PTR) -> CK_RV {
    let Some(f) = forward() else {
        return CKR_GENERAL_ERROR;
    };
    if list.is_null() {
        return CKR_GENERAL_ERROR;
    }
    // SAFETY: checked non-null; the pointee is 'static (inside FORWARD).
    unsafe { *list = &*f.patched as *const CK_FUNCTION_LIST as *mut CK_FUNCTION_LIST };
    CKR_OK
}

/// The functions counted when `KEYHOLDER_COUNT_FILE` is set.
pub const COUNTED: [&str; 18] = [
    "C_GetSlotList",
    "C_GetTokenInfo",
    "C_OpenSession",
    "C_CloseSession",
    "C_GetSessionInfo",
    "C_Login",
    "C_Logout",
    "C_FindObjectsInit",
    "C_FindObjects",
    "C_FindObjectsFinal",
    "C_GetAttributeValue",
    "C_SetAttributeValue",
    "C_CreateObject",
    "C_DestroyObject",
    "C_DeriveKey",
    "C_SignInit",
    "C_Sign",
    "C_GenerateKeyPair",
];

fn count_file() -> Option<std::ffi::OsString> {
    std::env::var_os("KEYHOLDER_COUNT_FILE")
}

/// Appends `name` as one line to the count file, if there is one. One
/// `write` of the whole line on an `O_APPEND` file, so lines from
/// concurrent calls do not interleave.
fn count(name: &str) {
    let Some(path) = count_file() else {
        return;
    };
    if let Ok(mut file) = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
    {
        let _ = file.write_all(format!("{name}\n").as_bytes());
    }
}

/// A wrapper that counts a call and forwards it to the real module.
macro_rules! counted {
    ($wrapper:ident, $field:ident, ($($arg:ident: $ty:ty),*)) => {
        unsafe extern "C" fn $wrapper($($arg: $ty),*) -> CK_RV {
            count(stringify!($field));
            let Some(real) = forward().and_then(|f| f.real.$field) else {
                return CKR_GENERAL_ERROR;
            };
            // SAFETY: forwarding the caller's arguments unchanged.
            unsafe { real($($arg),*) }
        }
    };
}

counted!(get_slot_list, C_GetSlotList, (present: CK_BBOOL, slots: CK_SLOT_ID_PTR, count: *mut CK_ULONG));
counted!(open_session, C_OpenSession, (slot: CK_SLOT_ID, flags: CK_FLAGS, app: *mut std::ffi::c_void, notify: CK_NOTIFY, session: *mut CK_SESSION_HANDLE));
counted!(close_session, C_CloseSession, (session: CK_SESSION_HANDLE));
counted!(logout, C_Logout, (session: CK_SESSION_HANDLE));
counted!(find_objects_init, C_FindObjectsInit, (session: CK_SESSION_HANDLE, template: CK_ATTRIBUTE_PTR, count: CK_ULONG));
counted!(find_objects, C_FindObjects, (session: CK_SESSION_HANDLE, objects: CK_OBJECT_HANDLE_PTR, max: CK_ULONG, count: *mut CK_ULONG));
counted!(find_objects_final, C_FindObjectsFinal, (session: CK_SESSION_HANDLE));
counted!(get_attribute_value, C_GetAttributeValue, (session: CK_SESSION_HANDLE, object: CK_OBJECT_HANDLE, template: CK_ATTRIBUTE_PTR, count: CK_ULONG));
counted!(set_attribute_value, C_SetAttributeValue, (session: CK_SESSION_HANDLE, object: CK_OBJECT_HANDLE, template: CK_ATTRIBUTE_PTR, count: CK_ULONG));
counted!(create_object, C_CreateObject, (session: CK_SESSION_HANDLE, template: CK_ATTRIBUTE_PTR, count: CK_ULONG, object: CK_OBJECT_HANDLE_PTR));
counted!(destroy_object, C_DestroyObject, (session: CK_SESSION_HANDLE, object: CK_OBJECT_HANDLE));
counted!(derive_key, C_DeriveKey, (session: CK_SESSION_HANDLE, mechanism: CK_MECHANISM_PTR, base: CK_OBJECT_HANDLE, template: CK_ATTRIBUTE_PTR, count: CK_ULONG, key: CK_OBJECT_HANDLE_PTR));
counted!(sign_init, C_SignInit, (session: CK_SESSION_HANDLE, mechanism: CK_MECHANISM_PTR, key: CK_OBJECT_HANDLE));
counted!(sign, C_Sign, (session: CK_SESSION_HANDLE, data: CK_BYTE_PTR, data_len: CK_ULONG, signature: CK_BYTE_PTR, signature_len: *mut CK_ULONG));

unsafe extern "C" fn get_token_info(slot: CK_SLOT_ID, info: CK_TOKEN_INFO_PTR) -> CK_RV {
    count("C_GetTokenInfo");
    let fault = fault();
    if fault == Fault::Removed {
        return CKR_TOKEN_NOT_PRESENT;
    }
    let Some(real) = forward().and_then(|f| f.real.C_GetTokenInfo) else {
        return CKR_GENERAL_ERROR;
    };
    // SAFETY: forwarding the caller's arguments unchanged.
    let rv = unsafe { real(slot, info) };
    if rv == CKR_OK && !info.is_null() {
        // SAFETY: the real module filled `info` and returned CKR_OK.
        let flags = unsafe { &mut (*info).flags };
        match fault {
            Fault::FinalTry => *flags |= CKF_USER_PIN_COUNT_LOW | CKF_USER_PIN_FINAL_TRY,
            Fault::PinLocked => *flags |= CKF_USER_PIN_LOCKED,
            _ => {}
        }
    }
    rv
}

unsafe extern "C" fn get_session_info(
    session: CK_SESSION_HANDLE,
    info: CK_SESSION_INFO_PTR,
) -> CK_RV {
    count("C_GetSessionInfo");
    if fault() == Fault::Removed {
        return CKR_DEVICE_REMOVED;
    }
    let Some(real) = forward().and_then(|f| f.real.C_GetSessionInfo) else {
        return CKR_GENERAL_ERROR;
    };
    // SAFETY: forwarding the caller's arguments unchanged.
    unsafe { real(session, info) }
}

unsafe extern "C" fn login(
    session: CK_SESSION_HANDLE,
    user: CK_USER_TYPE,
    pin: *mut u8,
    pin_len: CK_ULONG,
) -> CK_RV {
    count("C_Login");
    match fault() {
        Fault::Removed => return CKR_DEVICE_REMOVED,
        Fault::PinLocked => return CKR_PIN_LOCKED,
        _ => {}
    }
    let Some(real) = forward().and_then(|f| f.real.C_Login) else {
        return CKR_GENERAL_ERROR;
    };
    // SAFETY: forwarding the caller's arguments unchanged.
    unsafe { real(session, user, pin, pin_len) }
}

#[allow(clippy::too_many_arguments)]
unsafe extern "C" fn generate_key_pair(
    session: CK_SESSION_HANDLE,
    mechanism: CK_MECHANISM_PTR,
    public_template: CK_ATTRIBUTE_PTR,
    public_count: CK_ULONG,
    private_template: CK_ATTRIBUTE_PTR,
    private_count: CK_ULONG,
    public_key: CK_OBJECT_HANDLE_PTR,
    private_key: CK_OBJECT_HANDLE_PTR,
) -> CK_RV {
    count("C_GenerateKeyPair");
    match fault() {
        Fault::Removed => return CKR_DEVICE_REMOVED,
        Fault::KeygenUnsupported => return CKR_FUNCTION_NOT_SUPPORTED,
        Fault::KeygenGeneralError => return CKR_GENERAL_ERROR,
        _ => {}
    }
    let Some(real) = forward().and_then(|f| f.real.C_GenerateKeyPair) else {
        return CKR_GENERAL_ERROR;
    };
    // SAFETY: forwarding the caller's arguments unchanged.
    unsafe {
        real(
            session,
            mechanism,
            public_template,
            public_count,
            private_template,
            private_count,
            public_key,
            private_key,
        )
    }
}
